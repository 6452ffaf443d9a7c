"""Tasks in time (fprnn.data.tasks, fprnn.models.ctrnn, fprnn.training.objectives), float64: the start's rule plus
BPTT against independent references — autograd through a long settling from rest (w1), the
explicit per-sample w3 step — padding that leaves no trace, and trials that are the same in every
run with one seed."""
import json
import re

import pytest
import torch

from fprnn.models.ctrnn import TrialRNN
from fprnn.training.run import train
from fprnn.data.tasks import NeuroGymDataModule, collate, draw_trial, make_env
from fprnn.training.objectives import step_losses

from helpers import make_cfg

N, N_IN, N_OUT, B, T, K = 12, 3, 3, 5, 11, 4
TIGHT = {"tol": 1e-13, "max_iter": 500, "memory": 5, "damping": 1.0, "ridge": 1e-10, "mix_above": 1.0}


def net(start="fixed_point", rule="w1", **kw):
    m = TrialRNN(N, N_IN, N_OUT, start=start, dtype="float64", solver_kwargs=TIGHT, sigma_W=0.8, seed=3, **kw)
    m.set_backward(rule, 1.0, readin="gradient")
    with torch.no_grad():
        m.layer.b.normal_(0, 0.3)
        m.b_out.normal_(0, 0.3)
    return m


def batch(seed=0, static=K):
    g = torch.Generator().manual_seed(seed)
    ob = torch.randn(B, T, N_IN, generator=g, dtype=torch.float64)
    ob[:, :static] = ob[:, :1]                  # the static part: one input held
    gt = torch.randint(0, N_OUT, (B, T), generator=g)
    weight = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    return ob, torch.full((B,), static), gt, weight


def loss_of(logits, gt, weight):
    return step_losses(logits, gt, weight).sum() / weight.sum()


def by_hand(m, ob, gt, weight, r_start, hold):
    """The trial written out: r held at ``r_start`` for ``hold`` steps, then Euler steps."""
    L = m.layer
    alpha = m.dt / L.tau
    r, outs = r_start, []
    for t in range(T):
        if t >= hold:
            r = r + alpha * (torch.tanh(r @ L.W.T + ob[:, t] @ L.V.T + L.b) - r)
        outs.append(r @ m.W_out.T + m.b_out)
    return loss_of(torch.stack(outs, 1), gt, weight)


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def test_w1_start_equals_autograd_through_settling_from_rest():
    m = net()
    ob, static, gt, weight = batch()
    loss_of(m(ob, static), gt, weight).backward()
    assert m.report.at_fixed_point.all()
    got = grads(m)
    m.zero_grad()
    # reference: settle from rest by 3000 unrolled Euler steps of the static input, then the trial
    L, r = m.layer, torch.zeros(B, N, dtype=torch.float64)
    for _ in range(3000):
        r = r + (m.dt / L.tau) * (torch.tanh(r @ L.W.T + ob[:, 0] @ L.V.T + L.b) - r)
    by_hand(m, ob, gt, weight, r, K).backward()
    ref = grads(m)
    for name in ref:
        rel = float((got[name] - ref[name]).norm() / ref[name].norm())
        assert rel < 1e-8, (name, rel)


def test_w3_start_is_bptt_plus_the_explicit_w3_step():
    m = net(rule="w3")
    ob, static, gt, weight = batch(1)
    loss_of(m(ob, static), gt, weight).backward()
    W_grad = m.layer.W.grad.clone()
    # the dynamic part by autograd, from the start's fixed point as a leaf
    fp = m.report.fixed_point
    m.zero_grad()
    r0 = fp.r.clone().requires_grad_()
    dyn_W, delta = torch.autograd.grad(by_hand(m, ob, gt, weight, r0, K), [m.layer.W, r0])
    # w3 (eq 2.19) per sample: ΔW_i = −a_i b_iᵀ, a_i = (I − W G_i) G_i δ_i, b_i = (I − G_i W)ᵀ(I − G_i W) r_i
    W, I = m.layer.W.detach(), torch.eye(N, dtype=torch.float64)
    step = torch.zeros(N, N, dtype=torch.float64)
    for i in range(B):
        G = torch.diag(fp.gain[i])
        a = (I - W @ G) @ G @ delta[i]
        b = (I - G @ W).T @ (I - G @ W) @ fp.r[i]
        step -= torch.outer(a, b)
    expected = dyn_W - step           # W.grad is −ΔW: the optimizer descends along ΔW
    assert float((W_grad - expected).norm() / expected.norm()) < 1e-10


def test_static_steps_are_read_out_at_the_fixed_point_and_rest_runs_through_them():
    m = net()
    ob, static, gt, weight = batch(2)
    with torch.no_grad():
        R = m.states(ob, static)
        fp = m.report.fixed_point
        assert torch.equal(R[:, :K], fp.r.unsqueeze(1).expand(-1, K, -1))
        # residual of the fixed point, and one more Euler step with the static input leaves it
        step = R[:, K - 1] + (m.dt / m.layer.tau) * (torch.tanh(R[:, K - 1] @ m.layer.W.T + m.layer.input(ob[:, 0]))
                                                     - R[:, K - 1])
        assert float((step - fp.r).abs().max()) < 1e-12
        rest = net(start="rest")
        rest.load_state_dict(m.state_dict())
        R0 = rest.states(ob, static)
        assert float(R0[:, 0].abs().max()) > 0 and not torch.allclose(R0[:, :K], R[:, :K])


def test_unconverged_start_falls_back_to_rest():
    m = net()
    m.layer.solver_kwargs = dict(TIGHT, max_iter=1)     # no start converges in one iteration
    m.layer.fallback = None
    ob, static, gt, weight = batch(3)
    loss_of(m(ob, static), gt, weight).backward()
    assert m.report.from_rest == B and not m.report.at_fixed_point.any()
    got = m.layer.W.grad.clone()
    m.zero_grad()
    by_hand(m, ob, gt, weight, torch.zeros(B, N, dtype=torch.float64), 0).backward()
    assert float((got - m.layer.W.grad).norm() / got.norm()) < 1e-12


def test_truncation_cuts_the_gradient():
    m = net(start="rest", truncate=3)
    ob, static, gt, weight = batch(4)
    # only the last step's loss: its gradient to the inputs before the last 3 steps is zero
    ob = ob.clone().requires_grad_()
    m(ob, static)[:, -1].sum().backward()
    assert float(ob.grad[:, : T - 3].abs().max()) == 0 and float(ob.grad[:, -3:].abs().max()) > 0


def test_padding_leaves_no_trace():
    env = make_env("ContextDecisionMaking-v0", 20, {"use_expl_context": True,
                                                    "timing": {"delay": 300, "stimulus": 500}})
    trials = [(k, draw_trial(env, 0, "train", k, "auto", "decision")) for k in range(3)]
    long = make_env("ContextDecisionMaking-v0", 20, {"use_expl_context": True,
                                                     "timing": {"delay": 900, "stimulus": 500}})
    trials.append((3, draw_trial(long, 0, "train", 3, "auto", "decision")))
    padded = collate(trials, 5.0)
    assert padded["mask"][:3, -1].logical_not().all() and padded["mask"][3].all()
    m = TrialRNN(64, 7, 3, dtype="float64", seed=1)
    garbage = dict(padded, ob=torch.where(padded["mask"].unsqueeze(-1), padded["ob"], 1e6 * torch.ones_like(padded["ob"])),
                   gt=torch.where(padded["mask"], padded["gt"], torch.full_like(padded["gt"], 2)))
    per = [step_losses(m(b["ob"].double(), b["static"]), b["gt"], b["weight"].double()) for b in (padded, garbage)]
    alone = torch.cat([step_losses(m(b["ob"].double(), b["static"]), b["gt"], b["weight"].double())
                       for b in (collate([t], 5.0) for t in trials)])
    assert torch.equal(per[0], per[1])
    assert float((per[0] - alone).abs().max()) < 1e-12 * float(alone.abs().max())
    # the decision period weighs 5, the other steps 1, padding 0
    t = trials[0][1]
    w = padded["weight"][0]
    assert float(w[t.decision[0]:t.decision[1]].min()) == 5 and float(w[: t.decision[0]].max()) == 1
    assert float(w[len(t.ob):].abs().max()) == 0


def test_validation_and_test_trials_are_the_same_in_every_run_with_one_seed():
    kw = dict(kwargs={"use_expl_context": True, "timing": {"delay": 300}}, val_trials=40, test_trials=40)
    a, b, c = (NeuroGymDataModule(seed=s, **kw) for s in (7, 7, 8))
    for d in (a, b, c):
        d.setup()
    for split in ("val_set", "test_set"):
        ta, tb, tc = (collate([getattr(d, split)[k] for k in range(40)], 5.0) for d in (a, b, c))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
        assert not torch.equal(ta["ob"], tc["ob"])
    assert not torch.equal(collate([a.val_set[k] for k in range(40)], 5.0)["ob"],
                           collate([a.test_set[k] for k in range(40)], 5.0)["ob"])
    # training: epoch e draws fresh trials, the same for every run
    ea, eb = next(iter(a.train_dataloader())), next(iter(b.train_dataloader()))
    assert torch.equal(ea["ob"], eb["ob"])
    assert a.static == "auto" and int(ea["static"].min()) == 300 // 20      # fixation + context are the static part


def test_static_part_found_from_the_data_and_named():
    env = make_env("ContextDecisionMaking-v0", 20, {"use_expl_context": True, "timing": {"fixation": 500}})
    assert draw_trial(env, 0, "val", 0, "auto", "decision").static == 25
    assert draw_trial(env, 0, "val", 0, "fixation", "decision").static == 25
    assert draw_trial(env, 0, "val", 0, "none", "decision").static == 0
    with pytest.raises(ValueError, match="not constant"):
        draw_trial(env, 0, "val", 0, "stimulus", "decision")
    with pytest.raises(ValueError, match="periods are"):
        draw_trial(env, 0, "val", 0, "cue", "decision")


def test_preset_timings_merge_with_the_users_and_another_task_gets_its_own():
    import hydra
    d = hydra.utils.instantiate(make_cfg(["experiment=cdm", "data.kwargs={timing:{fixation:500}}"]).data)
    assert d.env.use_expl_context and d.env.timing["delay"] == 300 and d.env.timing["fixation"] == 500
    other = hydra.utils.instantiate(make_cfg(["experiment=cdm", "data.task=GoNogo-v0", "data.kwargs={}"]).data)
    assert other.kwargs == {} and other.n_in == 3 and other.n_out == 2


def test_bad_task_and_options_name_the_value():
    with pytest.raises(ValueError, match="unknown NeuroGym task 'Nope-v0'.*ContextDecisionMaking-v0"):
        NeuroGymDataModule(task="Nope-v0")
    with pytest.raises(ValueError, match="data.dt"):
        NeuroGymDataModule(kwargs={"dt": 10})
    with pytest.raises(ValueError, match="unknown start 'now'"):
        TrialRNN(8, 2, 2, start="now")
    with pytest.raises(ValueError, match="rule=bptt"):
        TrialRNN(8, 2, 2).set_backward("bptt")


def quick(tmp_path, *extra):
    return make_cfg(["experiment=cdm", "progress_bar=false", "logger=csv", "data.train_trials=128",
                     "data.val_trials=64", "data.test_trials=64", "trainer.max_epochs=1", *extra], tmp_path)


def test_a_task_without_a_static_first_period_starts_from_rest(tmp_path, caplog):
    res = train(quick(tmp_path, "data.task=PerceptualDecisionMaking-v0",
                      "data.kwargs={timing:{fixation:0,stimulus:300}}"))
    assert res["status"] == "finished" and res["start"] == "fixed_point"
    assert res["start_from_rest"] == 0 and res["solver_iters_mean"] == 0   # no start was solved
    assert "start from rest" in caplog.text


def test_cdm_dale_run_keeps_signs_and_reports(tmp_path):
    res = train(quick(tmp_path, "model.n_exc=0.8"))
    assert res["status"] == "finished" and res["constraint_violations"] == 0
    assert 0 <= res["test_perf"] <= 1 and res["start"] == "fixed_point"
    m = TrialRNN.load(tmp_path)
    sign, W = m.layer.sign, m.layer.W.detach()
    assert int((sign > 0).sum()) == round(0.8 * 128)
    assert (W[:, sign > 0] >= 0).all() and (W[:, sign < 0] <= 0).all() and (W != 0).float().mean() > 0.5
    records = json.loads((tmp_path / "trials.json").read_text())
    assert len(records) == 64
    assert abs(sum(r["choice"] == r["target"] for r in records) / 64 - res["test_perf"]) < 1e-6
    assert set(res["test_perf_by_condition"]) == {f"context={c} coh={h}" for c in (0, 1) for h in (5, 15, 50)}
    # the same loader as every network's: a checkpoint's network, and a weights file that does not fit named
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    from_ckpt = TrialRNN.load(ckpt)
    assert all(torch.equal(v, state[f"model.{k}"]) for k, v in from_ckpt.state_dict().items())
    weights = torch.load(tmp_path / "weights.pt")
    weights["W_out"] = weights["W_out"][:, :5]
    torch.save(weights, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"has W_out of shape \(3, 5\), the model \(3, 128\)"):
        TrialRNN.load(tmp_path)


def test_fixed_point_finder_on_a_linear_network():
    from fprnn.core.activations import get_activation
    from fprnn.analysis.fixed_points import find_fixed_points
    g = torch.Generator().manual_seed(5)
    n = 10
    W = 0.6 * torch.randn(n, n, generator=g, dtype=torch.float64) / n ** 0.5
    x = torch.randn(n, generator=g, dtype=torch.float64)
    tau = torch.full((n,), 100.0, dtype=torch.float64)
    found = find_fixed_points(W, x, torch.randn(7, n, generator=g, dtype=torch.float64), get_activation("identity"), tau)
    assert len(found) == 1                             # one fixed point, from every start
    eye = torch.eye(n, dtype=torch.float64)
    r_star = torch.linalg.solve(eye - W, x)
    assert float((found[0]["r"] - r_star).abs().max()) < 1e-12
    lam = torch.linalg.eigvals((W - eye) / 100.0)
    assert abs(found[0]["max_re"] - float(lam.real.max())) < 1e-12
    assert torch.allclose(found[0]["eig"].real.sort().values, lam.real.sort().values, atol=1e-12)
    assert found[0]["stable"] == bool(lam.real.max() < 0)


def test_fixed_point_finder_finds_saddles_and_unstable_points():
    """r = tanh(2r) per unit (W = 2I, x = 0): in two units, 3 × 3 fixed points — 0 and ±r* per
    unit, r* = tanh(2 r*) — four stable, four saddles, one unstable (the origin)."""
    from fprnn.core.activations import get_activation
    from fprnn.analysis.fixed_points import find_fixed_points
    r_star = 1.0
    for _ in range(100):
        r_star = float(torch.tanh(torch.tensor(2 * r_star, dtype=torch.float64)))
    grid = torch.tensor([-1.2, -0.3, 0.1, 0.35, 1.3], dtype=torch.float64)
    starts = torch.cartesian_prod(grid, grid)
    found = find_fixed_points(2 * torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), starts,
                              get_activation("tanh"))
    points = sorted(tuple(round(v, 9) for v in p["r"].tolist()) for p in found)
    expect = sorted((a, b) for a in (-r_star, 0.0, r_star) for b in (-r_star, 0.0, r_star))
    assert len(points) == 9 and all(abs(p - q) < 1e-8 for P, Q in zip(points, expect) for p, q in zip(P, Q))
    unstable_dims = sorted(int((p["eig"].real > 0).sum()) for p in found)
    assert unstable_dims == [0, 0, 0, 0, 1, 1, 1, 1, 2]


def test_two_devices_equal_one_device_for_a_network_in_time(tmp_path):
    """Every trained tensor of the network in time (the start's w3 plus BPTT), weighted losses over
    padded trials of different lengths on each device: 2 processes = 1 process."""
    from test_ddp import run_ddp
    over = ["experiment=cdm", "progress_bar=false", "logger=csv", "model.dtype=float64", "model.N=32",
            "solver.kwargs.tol=1e-12", "optimizer=sgd", "optimizer.lr=0.2", "data.batch_size=16", "data.train_trials=160",
            "data.test_trials=32", "data.val_trials=32", "trainer.max_steps=8", "trainer.limit_val_batches=0",
            "data.kwargs={timing:{delay:[100,200,300,400]}}", "module.check_every=4"]
    cfg = make_cfg(over, tmp_path / "one")
    train(cfg)
    run_ddp(over, tmp_path / "two")
    w1 = torch.load(tmp_path / "one" / "weights.pt")
    w2 = torch.load(tmp_path / "two" / "weights.pt")
    w0 = TrialRNN(32, 7, 3, dtype="float64", seed=0).state_dict()
    assert set(w1) == set(w2) and {"layers.0.W", "layers.0.V", "layers.0.b", "W_out", "b_out"} <= set(w1)
    for k in ("layers.0.W", "layers.0.V", "layers.0.b", "W_out", "b_out"):
        assert float((w2[k] - w1[k]).norm() / w1[k].norm()) < 1e-10, k
        assert not torch.equal(w1[k], w0[k]), f"{k} did not learn"


def test_figures_and_fixed_points_of_a_trained_network_in_time(tmp_path):
    from fprnn.analysis.figures import make_figures
    res = train(quick(tmp_path, "model.N=48"))
    files = {p.name for p in make_figures(tmp_path)}
    assert {"psychometric.png", "example_trials.png", "trajectories_pca.png", "fixed_points.png",
            "loss.png", "performance.png"} <= files
    fp = json.loads((tmp_path / "fixed_points.json").read_text())
    m = TrialRNN.load(tmp_path).double()
    for context in (0, 1):
        conds = [c for c in fp["conditions"] if c["context"] == context]
        assert len({c["level"] for c in conds}) >= 5           # signed coherences ±5, ±15, ±50
        for c in conds:
            assert c["fixed_points"], c
            x = m.layer.input(torch.tensor(c["input"], dtype=torch.float64)).detach()
            for p in c["fixed_points"]:     # each a fixed point of the trained dynamics, with its eigenvalues
                r = torch.tensor(p["r"], dtype=torch.float64)
                W = m.layer.W.detach()
                assert float((torch.tanh(W @ r + x) - r).abs().max()) < 1e-9
                J = ((1 - torch.tanh(W @ r + x) ** 2).unsqueeze(1) * W - torch.eye(48, dtype=torch.float64)) / 100.0
                assert abs(float(torch.linalg.eigvals(J).real.max()) - p["max_re_eig"]) < 1e-9
                assert len(p["eig_top"]) == 10 and p["stable"] == (p["max_re_eig"] < 0)
    assert res["status"] == "finished"


def test_learned_start_trains_the_initial_state_by_bptt():
    m = net(start="learned", rule="w3")
    with torch.no_grad():
        m.h0.normal_(0, 0.3)
    ob, static, gt, weight = batch(5)
    loss_of(m(ob, static), gt, weight).backward()
    got = grads(m)
    m.zero_grad()
    by_hand(m, ob, gt, weight, m.h0.expand(B, -1), 0).backward()
    for name, ref in grads(m).items():
        assert float((got[name] - ref).norm() / ref.norm()) < 1e-12, name


def test_a_resumed_epoch_draws_the_trials_it_had_not_seen():
    kw = dict(kwargs={"use_expl_context": True, "timing": {"delay": 300}}, batch_size=8, train_trials=40,
              val_trials=1, test_trials=1)
    whole = [b["index"] for b in NeuroGymDataModule(**kw).train_dataloader()]
    resumed = NeuroGymDataModule(**kw)
    resumed.load_state_dict({"epoch": 0, "batches_done": 2})
    assert [b["index"].tolist() for b in resumed.train_dataloader()] == [i.tolist() for i in whole[2:]]
    second = NeuroGymDataModule(**kw).train_dataloader()
    second.sampler.set_epoch(1)
    assert next(iter(second))["index"].tolist() == list(range(40, 48))     # a new epoch: fresh trials


def test_a_network_in_time_resumes_from_its_checkpoint(tmp_path):
    first = train(quick(tmp_path, "model.N=16", "data.train_trials=64", "data.batch_size=32"))
    assert first["status"] == "finished" and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    more = train(quick(tmp_path, "model.N=16", "data.train_trials=64", "data.batch_size=32", "trainer.max_epochs=2",
                       "resume=true"))
    assert more["status"] == "finished" and more["steps"] == 4 and more["epochs"] == 2


@pytest.mark.parametrize("option, value, why", [
    ("backtrack", 2, "step control re-solves a static network's batch"),
    ("max_nonconverged", 0.5, "a trial whose start does not converge starts from rest"),
    ("warmup_steps", 10, "set module.warmup_steps=0"),
])
def test_a_network_in_time_refuses_the_options_of_a_static_one(option, value, why):
    from fprnn.training.module import FixedPointModule
    from fprnn.training.objectives import Trials
    with pytest.raises(ValueError, match=rf"{option}={value}: .*{re.escape(why)}"):
        FixedPointModule(TrialRNN(8, 3, 2, seed=0), Trials(), rule="w3", **{option: value})
