"""Every task a neuroscientist trains (fprnn.data.tasks, fprnn.training.objectives, fprnn.models.ctrnn): continuous
targets under a masked MSE, a TrialEnv of the user's own and trials from a .npz file — the
examples of docs/guides/tasks.md run as written — NeuroGym tasks that cannot be trained refused in one line, and
trial starts checked for stability at every call, against independent references."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fprnn.models.ctrnn import TrialRNN
from fprnn.training.run import train
from fprnn.data.tasks import NeuroGymDataModule, TrialFileDataModule, draw_trial, make_env
from fprnn.training.objectives import WeightedR2, step_losses

from helpers import make_cfg

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "docs" / "guides" / "tasks.md"     # the examples of "Your own task"


def readme_block(first_line: str, lang: str = "python") -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)
    (code,) = [b for b in blocks if b.startswith(first_line)]
    return code


# -- continuous targets ------------------------------------------------------------------
def test_box_and_non_action_targets_are_continuous():
    reach = NeuroGymDataModule(task="ReachingDelayResponse-v0", val_trials=4, test_trials=4)
    assert (reach.targets, reach.n_out, reach.loss) == ("continuous", 2, "mse")
    b = reach.probe_batch(4)
    assert b["gt"].dtype == torch.float32 and b["gt"].shape[2] == 2
    env = make_env("ReachingDelayResponse-v0", 20, {})
    t = draw_trial(env, 0, "val", 2, "auto", "decision")
    assert torch.equal(b["gt"][2, :len(t.gt)], torch.from_numpy(t.gt))
    # Reaching1D's ground truth is an angle, not one of its 3 actions
    r1 = NeuroGymDataModule(task="Reaching1D-v0", val_trials=4, test_trials=4)
    assert (r1.targets, r1.n_out) == ("continuous", 1)
    cdm = NeuroGymDataModule(val_trials=4, test_trials=4)
    assert (cdm.targets, cdm.n_out, cdm.loss) == ("actions", 3, "cross_entropy")
    with pytest.raises(ValueError, match="loss=cross_entropy needs action targets"):
        NeuroGymDataModule(task="ReachingDelayResponse-v0", loss="cross_entropy")
    with pytest.raises(ValueError, match="loss=mse needs continuous targets"):
        NeuroGymDataModule(loss="mse")
    with pytest.raises(ValueError, match="unknown loss 'l1'"):
        NeuroGymDataModule(loss="l1")


def test_masked_mse_and_weighted_r2_against_per_step_formulas():
    g = torch.Generator().manual_seed(0)
    B, T, K = 4, 7, 3
    out, gt = torch.randn(B, T, K, generator=g, dtype=torch.float64), torch.randn(B, T, K, generator=g, dtype=torch.float64)
    weight = torch.rand(B, T, generator=g, dtype=torch.float64)
    weight[:, -2:] = 0
    out[:, -2:] = float("nan")          # padding: no trace
    got = step_losses(out, gt, weight)
    o, y, w = out.numpy(), gt.numpy(), weight.numpy()
    for i in range(B):
        ref = sum(w[i, t] * sum((o[i, t, k] - y[i, t, k]) ** 2 for k in range(K)) / K for t in range(T - 2))
        assert abs(float(got[i]) - ref) < 1e-12
    r2 = WeightedR2(K)
    r2.update(out[:2], gt[:2], weight[:2])         # over two batches: the same as one
    r2.update(out[2:], gt[2:], weight[2:])
    keep = w > 0
    ww, yy, oo = w[keep], y[keep], o[keep]
    mean = (ww[:, None] * yy).sum(0) / ww.sum()
    ref = 1 - (ww[:, None] * (yy - oo) ** 2).sum() / (ww[:, None] * (yy - mean) ** 2).sum()
    assert abs(float(r2.compute()) - ref) < 1e-12


def test_a_continuous_neurogym_task_trains_and_reports_mse_and_r2(tmp_path):
    res = train(make_cfg(["experiment=cdm", "data.task=ReachingDelayResponse-v0", "data.kwargs={}",
                          "progress_bar=false", "logger=csv", "data.train_trials=256", "data.val_trials=64",
                          "data.test_trials=64", "trainer.max_epochs=1"], tmp_path))
    assert res["status"] == "finished" and res["targets"] == "continuous"
    assert res["test_mse"] == res["test_loss"] and res["test_r2"] < 1 and "test_perf" not in res
    records = json.loads((tmp_path / "trials.json").read_text())
    assert len(records) == 64 and all(r["mse"] >= 0 for r in records)


# -- NeuroGym tasks that cannot be trained say why ---------------------------------------------
@pytest.mark.parametrize("task, message", [
    ("Bandit-v0", "reinforcement-learning task"), ("EconomicDecisionMaking-v0", "no supervised target"),
    ("DawTwoStep-v0", "reinforcement-learning task"), ("Null-v0", "builds no inputs"),
    ("AnnubesEnv-v0", "needs options session, catch_prob: give them in data.kwargs"),
])
def test_untrainable_tasks_are_refused_with_the_reason(task, message):
    with pytest.raises(ValueError, match=message):
        NeuroGymDataModule(task=task, kwargs={})


def test_a_refused_task_prints_one_plain_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=cdm", "data.task=Bandit-v0", "data.kwargs={}",
           "logger=none", "progress_bar=false", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in __import__("os").environ.items() if k != "HYDRA_FULL_ERROR"})
    assert proc.returncode == 1
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text and "Error in call to target" not in text and "ValueError" not in text, text
    assert proc.stderr.strip().splitlines()[0].startswith("error: task Bandit builds no inputs")


# -- a task of your own: a TrialEnv subclass ---------------------------------------------------
@pytest.fixture
def own_task(tmp_path, monkeypatch):
    (tmp_path / "my_tasks.py").write_text(readme_block("# my_tasks.py"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("my_tasks", None)


def test_an_own_trialenv_is_seeded_as_the_registered_ids(own_task):
    d = NeuroGymDataModule(task="my_tasks:PulseSign", kwargs={"noise": 0.2}, val_trials=8, test_trials=8)
    assert (d.targets, d.n_in, d.n_out) == ("actions", 2, 3) and d.env.noise == 0.2
    d.setup()
    import my_tasks
    env = my_tasks.PulseSign(dt=20, noise=0.2)
    for k in range(8):    # trial k of a split: a generator seeded by (seed, split, k) alone, as for an id
        env.seed(int(np.random.SeedSequence([0, 2, k]).generate_state(1)[0]))
        env.new_trial()
        t = d.test_set[k][1]
        assert np.array_equal(t.ob, env.ob.astype(np.float32)) and np.array_equal(t.gt, env.gt)
        assert t.static == 10                   # fixation, 200 ms of constant input
    with pytest.raises(ValueError, match="module 'my_tasks' has no 'Nope'"):
        NeuroGymDataModule(task="my_tasks:Nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        NeuroGymDataModule(task="no_such_module:Task")
    with pytest.raises(ValueError, match="not a NeuroGym TrialEnv subclass"):
        NeuroGymDataModule(task="my_tasks:np")


# -- trials from a file ----------------------------------------------------------------------
@pytest.fixture
def trials_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(readme_block("# make_trials.py"), {"__name__": "make_trials"})
    return tmp_path / "my_trials.npz"


def test_the_readme_trials_file_example_trains(trials_file, tmp_path):
    cmd = readme_block("# train on your trials", "bash").strip().splitlines()[-1]
    assert cmd == "python train.py experiment=trials data.path=my_trials.npz"
    run = tmp_path / "run"
    res = train(make_cfg([*cmd.split()[2:], "progress_bar=false", "logger=csv", "trainer.max_epochs=2"], run))
    assert res["status"] == "finished" and res["targets"] == "continuous" and res["data"] == "my_trials.npz"
    assert res["test_r2"] > 0.5, res["test_r2"]          # a constant output has R² ≤ 0
    assert res["start_stability_max"] < 1
    from fprnn.analysis.figures import make_figures
    files = {p.name for p in make_figures(run)}
    assert {"example_trials.png", "trajectories_pca.png", "fixed_points.png", "loss.png", "performance.png"} <= files
    fp = json.loads((run / "fixed_points.json").read_text())
    assert 2 <= len(fp["conditions"]) <= 8           # the continuous condition in quantile bins


def test_file_splits_are_held_out_by_seed_and_resume_where_they_were(trials_file):
    a, b, c = (TrialFileDataModule(str(trials_file), seed=s) for s in (1, 1, 2))
    for d in (a, b):
        d.setup()
    assert (a.train_trials, a.val_trials, a.test_trials) == (1600, 200, 200)
    ids = {k: set(v.tolist()) for k, v in a.split_ids.items()}
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert sorted(ids["train"] | ids["val"] | ids["test"]) == list(range(2000))
    assert all(np.array_equal(a.split_ids[k], b.split_ids[k]) for k in ids)
    assert not np.array_equal(a.split_ids["test"], c.split_ids["test"])
    x = np.load(trials_file)
    t = a.test_set[3][1]
    j = a.split_ids["test"][3]
    assert np.array_equal(t.ob, x["inputs"][j]) and np.array_equal(t.weight, x["mask"][j])
    assert t.static == 10 and t.answer == 59 and t.info == {"value": float(x["conditions"][j, 0])}
    # an epoch is every training trial once, in an order of its own; a resumed epoch the rest
    kw = dict(path=str(trials_file), batch_size=100, seed=1)
    whole = [bt["index"] for bt in TrialFileDataModule(**kw).train_dataloader()]
    assert len(whole) == 16
    seen = [a.draw("train", int(k)) for k in torch.cat(whole)]
    assert len({id(t) for t in seen}) == 1600
    resumed = TrialFileDataModule(**kw)
    resumed.load_state_dict({"epoch": 0, "batches_done": 5})
    assert [bt["index"].tolist() for bt in resumed.train_dataloader()] == [i.tolist() for i in whole[5:]]
    nxt = [a.draw("train", 1600 + k) for k in range(1600)]
    assert [id(t) for t in nxt] != [id(t) for t in seen] and {id(t) for t in nxt} == {id(t) for t in seen}


def _save(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("targets"), "key 'targets' is missing"),
    (lambda a: a.update(inputs=a["inputs"][0]), r"key 'inputs' has shape \(12, 2\)"),
    (lambda a: a.update(targets=a["targets"][:, :5]), r"key 'targets' has shape \(30, 5, 1\); expected \(30, 12\)"),
    (lambda a: a.update(targets=a["targets"][..., 0]), r"shape \(30, 12\) but dtype float32.*\(n, T, 1\)"),
    (lambda a: a.update(targets=-np.ones((30, 12), np.int64)), "action -1"),
    (lambda a: a.update(mask=np.ones((30, 11))), r"key 'mask' has shape \(30, 11\)"),
    (lambda a: a.update(static=np.full(30, 5)), "trial 0 holds its input for 5 steps"),
    (lambda a: a.update(answer=np.full(30, 12)), r"key 'answer' must hold steps in \[0, 11\]"),
    (lambda a: a.update(targtes=a["targets"]), "unknown key 'targtes'"),
    (lambda a: a.update(inputs=np.full((30, 12, 2), np.nan, np.float32)), "key 'inputs' has non-finite"),
    (lambda a: a.update(condition_names=np.array(["a", "b"])), "key 'condition_names' has shape"),
])
def test_a_bad_trials_file_is_named_in_one_line(tmp_path, change, message):
    g = np.random.default_rng(0)
    arrays = {"inputs": g.normal(size=(30, 12, 2)).astype(np.float32),
              "targets": g.normal(size=(30, 12, 1)).astype(np.float32)}
    change(arrays)
    with pytest.raises(ValueError, match=message):
        TrialFileDataModule(_save(tmp_path / "bad.npz", **arrays), batch_size=8)


def test_trials_file_actions_and_its_own_keys(tmp_path):
    g = np.random.default_rng(1)
    n, T = 40, 9
    inputs = np.repeat(g.normal(size=(n, 1, 3)), T, 1).astype(np.float32)
    inputs[:, 4:] += g.normal(size=(n, T - 4, 3)).astype(np.float32)
    targets = g.integers(0, 4, (n, T))
    d = TrialFileDataModule(_save(tmp_path / "a.npz", inputs=inputs, targets=targets, answer=np.full(n, 6),
                                  static=np.full(n, 3)), batch_size=8)
    assert (d.targets, d.n_out, d.loss, d.n_in) == ("actions", 4, "cross_entropy", 3)
    t = d.val_set[0][1] if d.val_set else d.draw("val", 0)
    assert t.static == 3 and t.answer == 6
    # what other generators write: a bool mask, step counts as floats, -100 labels where the mask is 0,
    # conditions in words
    mask = np.ones((n, T), bool)
    mask[:, :2] = False
    padded = np.where(mask, targets, -100)
    words = np.array([["left", "right"][k % 2] for k in range(n)])[:, None]
    d = TrialFileDataModule(_save(tmp_path / "c.npz", inputs=inputs, targets=padded, mask=mask,
                                  static=np.full(n, 3.0), conditions=words, condition_names=np.array(["side"])),
                            batch_size=8)
    t = d.draw("train", 0)
    assert t.static == 3 and t.weight.tolist() == [0, 0] + [1] * (T - 2) and t.answer == T - 1
    assert t.gt[:2].tolist() == [0, 0] and t.info["side"] in ("left", "right") and d.condition_keys == ["side"]
    with pytest.raises(ValueError, match="action -100 at a step of weight > 0"):
        TrialFileDataModule(_save(tmp_path / "d.npz", inputs=inputs, targets=padded), batch_size=8)
    auto = TrialFileDataModule(_save(tmp_path / "b.npz", inputs=inputs, targets=targets), batch_size=8)
    assert auto.draw("val", 0).static == 4                  # found: the input is constant for 4 steps
    small = TrialFileDataModule(str(tmp_path / "b.npz"))       # 32 training trials: one batch of them
    assert small.batch_size == 32 and "fewer than data.batch_size=64" in small.note
    assert [len(b["index"]) for b in small.train_dataloader()] == [32]
    # NaN targets where the mask is 0 (padding), refused where it counts
    y = g.normal(size=(n, T, 2)).astype(np.float32)
    y[:, -2:] = np.nan
    m = np.ones((n, T))
    m[:, -2:] = 0
    d = TrialFileDataModule(_save(tmp_path / "e.npz", inputs=inputs, targets=y, mask=m), batch_size=8)
    assert d.targets == "continuous" and np.isfinite(d.draw("val", 0).gt).all()
    with pytest.raises(ValueError, match="non-finite values at steps of weight > 0"):
        TrialFileDataModule(_save(tmp_path / "f.npz", inputs=inputs, targets=y), batch_size=8)
    with pytest.raises(FileNotFoundError, match="no such trials file"):
        TrialFileDataModule(str(tmp_path / "none.npz"))


# -- starts the dynamics keep ----------------------------------------------------------------
def _unstable_net(rule="w1"):
    """W = 1.5 I + small, b = 0: for a static input of zeros the solver, started at rest, sits at the
    fixed point r = 0, where max Re λ(G W) ≈ 1.5 > 1: a start the dynamics would leave."""
    N = 6
    m = TrialRNN(N, 2, 2, dtype="float64", sigma_W=0.0, seed=0)
    with torch.no_grad():
        m.layer.W.copy_(1.5 * torch.eye(N, dtype=torch.float64) + 0.01 * torch.randn(N, N, dtype=torch.float64,
                                                                                    generator=torch.Generator().manual_seed(1)))
    m.set_backward(rule, 1.0, readin="gradient")
    return m


def test_an_unstable_start_runs_from_rest_and_its_stability_is_the_eigenvalues():
    m = _unstable_net()
    B, T, K = 3, 9, 4
    g = torch.Generator().manual_seed(2)
    ob = torch.randn(B, T, 2, generator=g, dtype=torch.float64)
    ob[:, :K] = 0
    static = torch.full((B,), K)
    gt, weight = torch.randint(0, 2, (B, T), generator=g), torch.ones(B, T, dtype=torch.float64)
    step_losses(m(ob, static), gt, weight).sum().backward()
    rep = m.report
    assert rep.unstable == B and not rep.at_fixed_point.any() and rep.stability_max is None
    G = torch.diag_embed(rep.fixed_point.gain)
    lam = torch.linalg.eigvals(G @ m.layer.W.detach()).real.amax(-1)
    assert torch.allclose(rep.stability, lam, atol=1e-10) and bool((lam > 1).all())
    got = m.layer.W.grad.clone()
    m.zero_grad()
    rest = TrialRNN(6, 2, 2, start="rest", dtype="float64", sigma_W=0.0, seed=0)
    rest.load_state_dict(m.state_dict())
    step_losses(rest(ob, static), gt, weight).sum().backward()
    assert float((got - rest.layer.W.grad).norm() / got.norm()) < 1e-12


def test_stable_starts_are_kept_and_the_power_estimate_matches_a_real_dominant_eigenvalue():
    N = 40
    g = torch.Generator().manual_seed(3)
    A = torch.randn(N, N, generator=g, dtype=torch.float64)
    exact = TrialRNN(N, 2, 2, dtype="float64", seed=0, stability="exact")
    power = TrialRNN(N, 2, 2, dtype="float64", seed=0, stability="power")
    with torch.no_grad():
        for m in (exact, power):
            # symmetric: real eigenvalues; large enough that the certificate leaves every start open
            m.layer.W.copy_(0.7 * (A + A.T) / (2 * N) ** 0.5)
    ob = torch.randn(5, 6, 2, generator=g, dtype=torch.float64)
    ob[:, :3] = ob[:, :1]
    ob[3] = ob[0]                                   # trials 0 and 3 share their static input
    with torch.no_grad():
        exact(ob, torch.full((5,), 3))
        power(ob, torch.full((5,), 3))
    fp = exact.report.fixed_point
    lam = torch.linalg.eigvals(fp.gain.unsqueeze(-1) * exact.layer.W.detach()).real.amax(-1)
    assert torch.allclose(exact.report.stability, lam, atol=1e-10) and exact.report.at_fixed_point.all()
    # an estimate from below (converging like |λ₂/λ₁|^k), close to the exact value
    err = power.report.stability - lam
    assert power.report.certified == 0 and bool((err < 1e-9).all()) and float(err.abs().max()) < 0.05
    with pytest.raises(ValueError, match="unknown stability 'eig'"):
        TrialRNN(8, 2, 2, stability="eig")


def test_every_neurogym_task_gives_trials_a_network_takes_or_a_reason():
    """All registered ids with their own defaults: a data module whose batch a network in time maps to
    a finite loss of the task's kind, or a ValueError with the reason (five of them)."""
    from fprnn.data.tasks import task_names
    refused = {}
    for task in task_names():
        try:
            d = NeuroGymDataModule(task=task, kwargs={}, val_trials=3, test_trials=3)
        except ValueError as e:
            refused[task] = str(e)
            continue
        b = d.probe_batch(3)
        m = TrialRNN(16, d.n_in, d.n_out, dt=d.dt, seed=0)
        with torch.no_grad():
            loss = step_losses(m(b["ob"], b["static"]), b["gt"], b["weight"])
        assert torch.isfinite(loss).all() and (b["gt"].is_floating_point() == (d.targets == "continuous")), task
    assert set(refused) == {"AnnubesEnv-v0", "Bandit-v0", "DawTwoStep-v0", "EconomicDecisionMaking-v0", "Null-v0"}
    assert all("\n" not in why for why in refused.values())


def _flip_flop_file(path, n=400, T=40, bits=3, seed=0):
    """Sussillo & Barak's 3-bit flip-flop as a trials file: a ±1 pulse on a bit's input channel sets
    that bit's output until the next pulse; every bit is pulsed at the start; the conditions are the
    bits' final states, named bit0, bit1, bit2."""
    rng = np.random.default_rng(seed)
    inputs = np.zeros((n, T, bits), np.float32)
    inputs[:, 0] = rng.choice([-1.0, 1.0], (n, bits))
    later = rng.random((n, T, bits)) < 0.05
    inputs[:, 1:][later[:, 1:]] = rng.choice([-1.0, 1.0], int(later[:, 1:].sum()))
    state, targets = inputs[:, 0].copy(), np.zeros((n, T, bits), np.float32)
    for t in range(T):
        state = np.where(inputs[:, t] != 0, inputs[:, t], state)
        targets[:, t] = state
    np.savez(path, inputs=inputs, targets=targets, static=np.zeros(n, int), conditions=state,
             condition_names=np.array(["bit0", "bit1", "bit2"]))


def test_figures_of_a_multi_bit_task_are_labelled_with_its_own_condition_names(tmp_path, monkeypatch):
    import matplotlib.text
    from fprnn.analysis.trial_figures import plot_trials
    monkeypatch.chdir(tmp_path)
    _flip_flop_file(tmp_path / "flipflop.npz")
    run = tmp_path / "run"
    res = train(make_cfg(["experiment=trials", "data.path=flipflop.npz", "model.N=32", "progress_bar=false",
                          "logger=csv", "trainer.max_epochs=2"], run))
    assert res["status"] == "finished" and res["targets"] == "continuous"
    texts, axes3d = {}, {}

    def save(fig, out, name, written):
        texts[name] = " ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        axes3d[name] = [ax.name for ax in fig.axes]
    plot_trials(run, tmp_path / "figures", [], save)
    fp = json.loads((run / "fixed_points.json").read_text())
    assert fp["level_names"] == ["bit0", "bit1", "bit2"]
    assert len(fp["conditions"]) == 8 and all(len(c["level"]) == 3 for c in fp["conditions"])
    for name in ("fixed_points", "trajectories_pca"):
        assert all(f"bit{k}" in texts[name] for k in range(3)), (name, texts[name])
        assert "coherence" not in texts[name] and "context" not in texts[name]
    assert "3d" in axes3d["fixed_points"]                  # the conditions' fixed points in 3-D PCA
    assert "output 2" in texts["example_trials"]
