"""Mazes (fprnn.data.mazes) and the conv layer on maps of any size (issue 37): the generator against an
independent breadth-first search, the size-agnostic layer against the fixed-size one, the norm
bound against the conv matrix's singular values, recorded faults, and `python -m fprnn.mazes`."""
import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch

from fprnn.core import operators

from fprnn.data import mazes
from fprnn.models.conv import ConvFixedPointLayer
from fprnn.models.maze_net import MazeNet
from fprnn.training.run import build, train
from helpers import make_cfg

ROOT = Path(__file__).resolve().parents[1]
D = torch.float64


def bfs_parents(open_: np.ndarray, start):
    """Breadth-first search over open pixels (4-neighbours): each reached pixel's parent."""
    parent, todo = {start: None}, deque([start])
    while todo:
        p = todo.popleft()
        for q in ((p[0] - 1, p[1]), (p[0] + 1, p[1]), (p[0], p[1] - 1), (p[0], p[1] + 1)):
            if 0 <= q[0] < open_.shape[0] and 0 <= q[1] < open_.shape[1] and open_[q] and q not in parent:
                parent[q] = p
                todo.append(q)
    return parent


@pytest.mark.parametrize("generator", ["dfs", "kruskal"])
@pytest.mark.parametrize("cells", [2, 3, 5, 8])
def test_every_maze_is_a_tree_and_its_target_is_the_bfs_path(cells, generator):
    for k in range(20):
        x, y = mazes.draw(7, "train", cells, k, generator)
        open_, side = x[0].astype(bool), 2 * cells + 1
        assert x.shape == (3, side, side) and y.shape == (side, side)
        assert not open_[0].any() and not open_[-1].any() and not open_[:, 0].any() and not open_[:, -1].any()
        assert not open_[::2, ::2].any() and open_[1::2, 1::2].all()      # corners closed, every cell open
        (s,), (g,) = [tuple(np.argwhere(x[c])) for c in (1, 2)]
        s, g = tuple(map(int, s)), tuple(map(int, g))
        assert s != g and s[0] % 2 == 1 and s[1] % 2 == 1 and g[0] % 2 == 1 and g[1] % 2 == 1
        parent = bfs_parents(open_, s)
        assert len(parent) == open_.sum()                  # every open pixel (every cell) reachable
        assert open_.sum() == cells ** 2 + cells ** 2 - 1  # c² cells and c² − 1 joins: a tree, one path
        path, p = np.zeros_like(open_), g
        while p is not None:
            path[p], p = True, parent[p]
        assert np.array_equal(path, y.astype(bool)) and y[s] == 1 and y[g] == 1


def test_the_generators_differ_and_an_unknown_one_is_named():
    """Kruskal's mazes have more dead ends (cells with one opening) than depth-first search's long corridors."""
    def dead_ends(generator):
        x = np.stack([mazes.draw(1, "test", 8, k, generator)[0][0] for k in range(30)]).astype(int)
        joins = sum(np.roll(x, s, axis) for s in (1, -1) for axis in (1, 2))[:, 1::2, 1::2]
        return int((joins == 1).sum())
    assert dead_ends("kruskal") > 1.5 * dead_ends("dfs")
    with pytest.raises(ValueError, match=r"unknown maze generator 'prim'; choose one of \['dfs', 'kruskal'\]"):
        mazes.draw(0, "test", 4, 0, "prim")


def test_mazes_are_seeded_by_seed_split_size_and_index_alone():
    a = mazes.draw(0, "val", 4, 3)
    assert all(np.array_equal(u, v) for u, v in zip(a, mazes.draw(0, "val", 4, 3)))
    for other in [(1, "val", 4, 3), (0, "test", 4, 3), (0, "val", 4, 4)]:
        assert not np.array_equal(a[0], mazes.draw(*other)[0])
    with pytest.raises(ValueError, match="at least 2 cells per side, got 1"):
        mazes.draw(0, "train", 1, 0)
    with pytest.raises(ValueError, match="test_cells must be a list"):
        mazes.MazeDataModule(test_cells=9)


def test_a_resumed_epoch_draws_the_mazes_it_had_not_seen():
    data = mazes.MazeDataModule(cells=3, train_mazes=64, batch_size=16, test_cells=[])
    full = [x for x, _ in data.train_dataloader()]
    data.load_state_dict({"epoch": 0, "batches_done": 2})
    rest = [x for x, _ in data.train_dataloader()]
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:]))


def test_mixed_sizes_lay_each_maze_in_a_closed_canvas_of_the_largest():
    """train_cells: every training maze is a maze of one of the sizes (a tree whose target is the BFS
    path), at an even offset in a closed canvas of the largest size; validation stays at ``cells``."""
    data = mazes.MazeDataModule(cells=4, train_cells=[2, 3, 4], train_mazes=96, batch_size=32, test_cells=[])
    xs, ys = map(torch.cat, zip(*data.train_dataloader()))
    assert xs.shape == (96, 3, 9, 9) and ys.shape == (96, 9, 9)
    seen = set()
    for x, y in zip(xs.numpy(), ys.numpy()):
        open_ = x[0].astype(bool)
        rows, cols = np.nonzero(open_.any(1))[0], np.nonzero(open_.any(0))[0]
        c = (rows[-1] - rows[0]) // 2 + 1                       # the cells the open pixels span
        assert cols[-1] - cols[0] == rows[-1] - rows[0] and rows[0] % 2 == 1 and cols[0] % 2 == 1
        assert open_.sum() == 2 * c * c - 1                     # a tree of c² cells
        seen.add(int(c))
        s, g = [tuple(int(v) for v in np.argwhere(x[ch])[0]) for ch in (1, 2)]
        parent, path, p = bfs_parents(open_, s), np.zeros_like(open_), g
        while p is not None:
            path[p], p = True, parent[p]
        assert np.array_equal(path, y.astype(bool))
    assert seen == {2, 3, 4}
    data.setup()
    assert data.val_set[0][1][0].shape == (3, 9, 9)
    again = mazes.MazeDataModule(cells=4, train_cells=[2, 3, 4], train_mazes=96, batch_size=32, test_cells=[])
    assert torch.equal(next(iter(again.train_dataloader()))[0], xs[:32])
    for bad in (3, [], [1, 3]):
        with pytest.raises(ValueError, match="train_cells"):
            mazes.MazeDataModule(train_cells=bad)


def test_anderson_at_test_time_is_checked_against_the_networks_own_fixed_point():
    """A contraction has one fixed point: another solver at test time (plain iteration, against the
    layer's classic Anderson) reaches it, to the tolerance — the same state within 1e-3, not bit for
    bit (atol 0 finds them apart); the curve's first point with it is a fresh solve; an unknown
    method is named."""
    from fprnn.analysis.mazes import evaluate, same_fixed_point, settling_curve, solve_options
    net = MazeNet(channels=4, head_channels=4, sigma_W=0.3, solver="anderson",
                  solver_kwargs={"tol": 1e-6, "mix_above": 0.0}, seed=3, iters_per_side=8).double()
    x, y = mazes.collate([(k, mazes.draw(0, "test", 4, k)) for k in range(6)])
    agree = same_fixed_point(net, x, "iterate", 200)
    assert agree == {"both_settled": 1.0, "same_state": 1.0, "same_answer": 1.0}
    assert same_fixed_point(net, x, "iterate", 200, atol=0.0)["same_state"] < 1
    curve = settling_curve(net, x, y, [3, 200], method="iterate")
    fresh = evaluate(net, x, y, budget=solve_options(net, "iterate", 3))
    assert curve[3]["maze_acc"] == fresh["maze_acc"] and curve[3]["settled"] == 1 - fresh["unconverged"] / 6
    assert curve[200]["settled"] == 1.0
    with pytest.raises(ValueError, match=r"unknown solver 'newton' in the budget; choose one of \['anderson'"):
        net(x, None, {**solve_options(net, None, 10), "method": "newton"})


def test_the_size_agnostic_layer_is_the_fixed_size_one():
    x = torch.randn(3, 4, 5, 7, dtype=D, generator=torch.Generator().manual_seed(0))
    out = {}
    for size in [(5, 7), None]:
        layer = ConvFixedPointLayer(4, size, rule="w3", dtype="float64", sigma_W=0.8, max_norm=None,
                                    solver_kwargs={"tol": 1e-13})
        xv = x.clone().requires_grad_(True)
        r = layer(xv)
        (r ** 3).sum().backward()
        out[size] = r.detach(), layer.W.grad, xv.grad
    for a, b in zip(out[(5, 7)], out[None]):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    layer = ConvFixedPointLayer(4, None, dtype="float64")
    assert layer(torch.randn(2, 4, 11, 3, dtype=D)).shape == (2, 4, 11, 3)    # any size, one kernel


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_the_kernel_norm_bound_holds_on_every_size_and_is_tight(padding):
    K = torch.randn(4, 4, 3, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    bound = float(operators.kernel_norm_bound(K))
    norms = [float(torch.linalg.matrix_norm(operators.Conv2d(K, size, padding).matrix(), ord=2))
             for size in [(3, 3), (5, 7), (8, 8), (16, 16)]]
    assert max(norms) <= bound <= 1.12 * max(norms)


def test_max_norm_makes_any_step_a_contraction_and_faults_raise_or_are_recorded():
    from fprnn.core.implicit import FixedPointFault
    x = torch.randn(2, 4, 6, 6, dtype=D)
    raising = ConvFixedPointLayer(4, None, dtype="float64", max_norm=0.9, rule="w2", eta=1e6)    # throw=True
    with pytest.raises(FixedPointFault, match="domain"):
        (raising(x) ** 2).sum().backward()
    layer = ConvFixedPointLayer(4, None, dtype="float64", max_norm=0.9, rule="w2", eta=1e6, throw=False)
    with torch.no_grad():
        layer.W.mul_(50)                       # an optimizer's wild step
    r = layer(x)
    # circular 32×32 maps: W's norm is the largest σ_max of the kernel's response at their 32² frequencies
    response = torch.fft.fft2(layer.W.detach(), s=(32, 32)).permute(2, 3, 0, 1)
    exact = float(torch.linalg.matrix_norm(response, ord=2).max())
    assert layer.rescaled == 1 and 0.88 < exact <= 0.9 * 1.02       # the power estimate is from below
    assert exact <= float(operators.kernel_norm_bound(layer.W)) <= 1.12 * exact
    assert bool(layer.report.used.all())       # a contraction: every sample's fixed point reached
    with pytest.warns(RuntimeWarning, match="fault was recorded"):
        (r ** 2).sum().backward()              # w2 at η = 10⁶ leaves its domain
    assert len(layer.faults) == 1 and "domain" in layer.faults[0] and not layer.W.grad.any()


def test_the_mnist_example_trains_with_the_layer_and_counts_its_faults(mnist_dir):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import mnist_cnn
    finally:
        sys.path.pop(0)
    out = mnist_cnn.main(["--layer", "w3", "--data-root", str(mnist_dir), "--train-size", "192",
                          "--test-size", "200", "--log-interval", "100"])
    assert out["faults"] == 0 and 0.2 < out["test_acc"] <= 1 and out["rescaled"] >= 1


def test_a_trained_run_answers_mazes_from_a_file(tmp_path, capsys):
    run = tmp_path / "run"
    res = train(make_cfg(["experiment=mazes", "progress_bar=false", "logger=csv", "data.train_mazes=64",
                          "data.val_mazes=16", "data.test_mazes=16", "data.test_mazes_large=4", "data.test_cells=[5]",
                          "model.channels=4", "model.head_channels=4", "trainer.max_epochs=1"], run))
    assert res["status"] == "finished" and 0 <= res["test_maze_acc"] <= 1
    assert set(res["extrapolation"]) == {4, 5} and Path(res["maze_figure"]).is_file()
    at_4 = res["extrapolation"][4]       # the same test mazes through the maze report's own solves
    assert res["test_settled"] == pytest.approx(1 - at_4["unconverged"] / at_4["mazes"]) == res["settled_4"]
    assert res["path_independent_5"] == res["path_independence"][5]["same_fixed_point"]
    assert res["test_maze_acc"] == pytest.approx(at_4["maze_acc"])
    rng = np.random.default_rng(5)
    x, y = map(np.stack, zip(*[mazes.make_maze(6, rng, "kruskal") for _ in range(10)]))
    x = x.astype(np.uint8)      # any numbers are read as floats
    np.savez(tmp_path / "m.npz", inputs=x, targets=y)
    proc = subprocess.run([sys.executable, "-m", "fprnn.mazes", str(run), str(tmp_path / "m.npz")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    net = MazeNet.load(run).eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(x).float()).argmax(1).numpy()
    assert got["maze_acc"] == pytest.approx(float((pred == y).reshape(10, -1).all(1).mean()))
    assert got["pixel_acc"] == pytest.approx(float((pred == y).mean())) and got["height"] == 13
    assert Path(res["settling_figure"]).is_file()

    # larger mazes drawn by the CLI: each budget's point is a fresh solve with that budget (evaluate's)
    from fprnn.analysis.mazes import evaluate
    big = subprocess.run([sys.executable, "-m", "fprnn.mazes", str(run), "--cells", "5", "7", "--mazes", "6",
                          "--generator", "kruskal", "--iters-per-side", "0.5,3", "--out", str(tmp_path / "big")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert big.returncode == 0, big.stderr
    curves = json.loads(big.stdout.strip().splitlines()[-1])
    assert curves == json.loads((tmp_path / "big" / "large_mazes.json").read_text())
    assert (tmp_path / "big" / "large_mazes.png").is_file() and "| 7 | 15 | 45 |" in big.stdout
    for c, budgets in ((5, (6, 33)), (7, (8, 45))):
        xs, ys = mazes.collate([(k, mazes.draw(0, "test", c, k, "kruskal")) for k in range(6)])
        assert sorted(map(int, curves[str(c)])) == list(budgets)
        for b in budgets:
            fresh = evaluate(net, xs, ys, budget={"solver": {**net.layer.solver_kwargs, "max_iter": b},
                                                  "fallback": None})
            point = curves[str(c)][str(b)]
            assert point["maze_acc"] == pytest.approx(fresh["maze_acc"])
            assert point["settled"] == pytest.approx(1 - fresh["unconverged"] / 6) and point["seconds_per_maze"] > 0
    for argv, why in (([str(tmp_path / "m.npz"), "--cells", "5"], "give a mazes file or --cells (not both)"),
                      (["--cells", "5", "--generator", "prim"], "unknown --generator 'prim'"),
                      (["--cells", "1"], "--cells must be cells per side ≥ 2, got 1")):
        bad = subprocess.run([sys.executable, "-m", "fprnn.mazes", str(run), *argv],
                             capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert bad.returncode == 2 and why in bad.stderr, bad.stderr

    from fprnn.tools.mazes import main       # --solver: the curve by another solver, checked against the layer's
    checked = main([str(run), "--cells", "5", "--mazes", "4", "--iters-per-side", "3", "--solver", "anderson"])
    assert set(checked) == {"curves", "same_fixed_point"} and list(checked["curves"][5]) == [33]
    assert set(checked["same_fixed_point"][5]) == {"both_settled", "same_state", "same_answer"}
    with pytest.raises(SystemExit) as stop:
        main([str(run), "--cells", "5", "--solver", "newton"])
    assert stop.value.code == 2 and "unknown --solver 'newton'" in capsys.readouterr().err

    np.savez(tmp_path / "bad.npz", inputs=x[:, :2], targets=y)
    bad = subprocess.run([sys.executable, "-m", "fprnn.mazes", str(run), str(tmp_path / "bad.npz")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and "inputs has shape (10, 2, 13, 13)" in bad.stderr

    # init_weights: the trained network, built again from a config (here to go on with w3), holds its weights
    small = ["experiment=mazes", "logger=csv", "model.channels=4", "model.head_channels=4"]
    _, again, _, _ = build(make_cfg([*small, "rule=w3", "fault.unsettled=leave_out", f"init_weights={run}"]),
                           tmp_path / "w3")
    for name, t in net.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    with pytest.raises(ValueError, match=r"init_weights=.*layers\.0\.W"):
        build(make_cfg([*small, "model.channels=2", f"init_weights={run}"]), tmp_path / "c2")
    with pytest.raises(FileNotFoundError, match="no weights.pt in that run directory"):
        build(make_cfg([*small, f"init_weights={tmp_path}"]), tmp_path / "none")


def test_the_solve_budget_grows_with_the_longer_side():
    layer = ConvFixedPointLayer(2, None, iters_per_side=4, solver_kwargs={"max_iter": 50},
                                fallback={"method": "rk23", "steps": 100})
    assert layer.budget((9, 9))["solver"]["max_iter"] == 50                 # the configured budget is the floor
    big = layer.budget((9, 33))
    assert big["solver"]["max_iter"] == 132 and big["fallback"]["steps"] == 132
    assert ConvFixedPointLayer(2, None).budget((99, 99))["solver"] == {}     # no iters_per_side: as configured


def _one_step(net, x, y, **options):
    """One training step of a FixedPointModule (SGD with lr 1: W ← W − its gradient) on batch (x, y)."""
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset
    from fprnn.training.module import FixedPointModule
    module = FixedPointModule(net, rule="bptt", lr=1.0, readin="gradient", **options)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, enable_model_summary=False)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=len(x)))
    return module


def _bptt_reference_loss(net, x, y, mu, steps=4, mu_rho=0.0, target=0.9):
    """The loss bptt differentiates, written out on maps with torch's conv2d: the solve (no graph), then
    `steps` damped steps u ← u + ½(tanh(K ⋆ u + x) − u) with graph; the per-pixel cross-entropy of the head's
    logits, plus mu · mean (tanh(K ⋆ u + x) − u)² per maze, plus mu_rho · max(0, ‖G K ⋆ v‖ − target)² with
    G = tanh'(K ⋆ u* + x) at the solve's state u* and v its power iteration's unit direction (no graph,
    from the layer's seeded start); the mean over mazes."""
    import torch.nn.functional as F
    X, L = net.features(x.double()), net.layer
    size = tuple(X.shape[2:])
    with torch.no_grad():
        u = L.maps(L.fixed_point(L.rows(X), size=size).solution.u, size).clone()
    conv = lambda v: F.conv2d(v, L.W, padding=L.kernel // 2)     # noqa: E731
    g = lambda u: torch.tanh(conv(u) + X)     # noqa: E731
    gain = 1 - torch.tanh(conv(u) + X).pow(2)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        v = L.maps(torch.randn((len(x), L.channels * size[0] * size[1]), generator=gen, dtype=torch.float64), size)
        unit = lambda v: v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)     # noqa: E731
        v = unit(v)
        for _ in range(L.stability_iters):
            v = unit(gain * conv(v))
    growth = (gain * conv(v)).flatten(1).norm(dim=1)
    u_star = u
    for _ in range(steps):
        u = u + 0.5 * (g(u) - u)
    ce = F.cross_entropy(net.head(u), y, reduction="none").flatten(1).mean(1)
    penalty = mu * (g(u) - u).pow(2).flatten(1).mean(1) + mu_rho * F.relu(growth - target).pow(2)
    assert not mu_rho or bool((growth > target).any()) and torch.equal(u_star, u_star.detach())
    return (ce + penalty).mean()


@pytest.mark.parametrize("clip, mu, mu_rho", [(None, 0.0, 0.0), (0.05, 0.0, 0.0), (None, 0.7, 0.0), (None, 0.0, 3.0)])
def test_bptt_trains_on_unsettled_mazes_through_their_iteration(clip, mu, mu_rho):
    """fault.unsettled=train: no maze settles in 5 iterations, yet the step is taken, and it is SGD on
    the gradient of the mean loss over every maze (clipped to a total norm, as torch clips; with the
    settling penalty mu, or the stability penalty mu_rho above ρ̂ = 0.5), against the unrolled iteration
    and the power iteration written out with conv2d."""
    import copy
    x, y = mazes.collate([(k, mazes.draw(0, "train", 3, k)) for k in range(6)])
    options = dict(channels=4, head_channels=4, rule="bptt", sigma_W=1.0, max_norm=None, solver="iterate",
                   solver_kwargs={"max_iter": 5, "tol": 1e-9}, fallback=None, dtype="float64", bptt_steps=4)
    net = MazeNet(**options)
    ref = copy.deepcopy(net)
    _bptt_reference_loss(ref, x, y, mu, mu_rho=mu_rho, target=0.5).backward()
    if clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
        assert norm > 2 * clip                                # the clipping had something to do
    module = _one_step(net, x, y, unsettled="train", clip_grad_norm=clip, settle_penalty=mu,
                       stability_penalty=mu_rho, stability_target=0.5)
    step = module.last_step
    assert not step.skipped and step.n_used == 0 and int(step.trained.sum()) == 6
    assert module.record.unconverged == 6 and module.record.faults == 0
    for (name, after), before in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(after.detach(), (before - before.grad).detach(), atol=1e-12, rtol=0, msg=name)

    left_out = MazeNet(**options)
    W0 = left_out.layer.W.detach().clone()
    module = _one_step(left_out, x, y)                   # the default: unsettled mazes are left out
    assert module.last_step.skipped and "not converged for 6/6" in module.record.fault_log[0]
    assert torch.equal(left_out.layer.W.detach(), W0)


def test_unsettled_clip_and_settle_options_name_what_is_allowed():
    from fprnn.training.module import FixedPointModule
    net = MazeNet(channels=2, head_channels=2)
    with pytest.raises(ValueError, match="unsettled='train' needs rule=bptt, got rule='w3'"):
        FixedPointModule(net, rule="w3", unsettled="train")
    with pytest.raises(ValueError, match=r"unsettled must be one of \['leave_out', 'train'\], got 'keep'"):
        FixedPointModule(net, rule="bptt", unsettled="keep")
    with pytest.raises(ValueError, match="clip_grad_norm must be a positive finite number or null .* got 0"):
        FixedPointModule(net, rule="bptt", clip_grad_norm=0)
    with pytest.raises(ValueError, match="settle_penalty=0.5 needs rule=bptt .* got rule='w3'"):
        FixedPointModule(net, rule="w3", settle_penalty=0.5)
    with pytest.raises(ValueError, match="settle_penalty must be a non-negative finite number .* got -1"):
        FixedPointModule(net, rule="bptt", settle_penalty=-1)
    with pytest.raises(ValueError, match="stability_penalty=2 needs rule=bptt .* got rule='w1'"):
        FixedPointModule(net, rule="w1", stability_penalty=2)
    with pytest.raises(ValueError, match="stability_penalty must be a non-negative finite number .* got nan"):
        FixedPointModule(net, rule="bptt", stability_penalty=float("nan"))
    with pytest.raises(ValueError, match="stability_target must be a positive finite number .* got 0"):
        FixedPointModule(net, rule="bptt", stability_penalty=1.0, stability_target=0)


def test_random_starts_reach_the_one_fixed_point_of_a_contraction_from_elsewhere():
    """data.random_starts: the share of training mazes solved from a random state. K scaled to a
    contraction (‖W‖₂ ≤ 0.5) has one fixed point, so the step from random starts takes the same loss
    and gradients as from rest (to the solve's tolerance), while its solves start elsewhere and take
    more iterations; with the share 0 the step is the one from rest, bit for bit."""
    from fprnn.training.objectives import Mazes
    x, y = mazes.collate([(k, mazes.draw(0, "train", 3, k)) for k in range(8)])
    options = dict(channels=4, head_channels=4, rule="bptt", max_norm=0.5, solver="iterate", fallback=None,
                   solver_kwargs={"max_iter": 400, "tol": 1e-12}, dtype="float64", bptt_steps=3)
    steps = {}
    for share in (0.0, 1.0):
        net = MazeNet(**options)
        module = _one_step(net, x, y, objective=Mazes(random_starts=share, seed=5))
        steps[share] = (module.last_step, dict(net.named_parameters()))
    (rest, after_rest), (rand, after_rand) = steps[0.0], steps[1.0]
    assert rest.fault is None and rand.fault is None
    torch.testing.assert_close(rand.losses, rest.losses, atol=1e-9, rtol=0)
    for name, t in after_rest.items():
        torch.testing.assert_close(after_rand[name], t, atol=1e-8, rtol=0, msg=name)
    assert float(rand.fps[0].solution.iters.float().mean()) > float(rest.fps[0].solution.iters.float().mean())
    base = MazeNet(**options)
    plain = _one_step(base, x, y)                                # the static objective: from rest
    assert torch.equal(plain.last_step.losses, rest.losses)
    with pytest.raises(ValueError, match=r"random_starts must be a share of the training mazes in \[0, 1\], got 1.5"):
        mazes.MazeDataModule(random_starts=1.5)
    with pytest.raises(ValueError, match="random_starts must be a number ≥ 0, got -0.1"):
        mazes.MazeDataModule(random_starts=-0.1)


def _progressive_reference(net, x, y, n, k):
    """The progressive loss's mean written out with conv2d: n plain iterations u ← tanh(K ⋆ u + x) from
    rest without a graph, k with one, the per-pixel cross-entropy of the head's logits."""
    import torch.nn.functional as F
    X, L = net.features(x.double()), net.layer
    g = lambda u, K: torch.tanh(F.conv2d(u, K, padding=L.kernel // 2) + X)     # noqa: E731
    u = torch.zeros(len(x), L.channels, *x.shape[2:], dtype=torch.float64)
    with torch.no_grad():
        for _ in range(n):
            u = g(u, L.W)
    for _ in range(k):
        u = g(u, L.W)
    return F.cross_entropy(net.head(u), y, reduction="none").flatten(1).mean(1).mean()


@pytest.mark.parametrize("seed", [2, 7])
def test_the_progressive_loss_is_the_weighted_sum_with_the_iteration_written_out(seed):
    """data.progressive α: the step is SGD on the gradient of (1 − α) L + α L_prog (L_prog after n
    iterations without a graph and k with one, n + k ≤ 5), against both
    written out with conv2d."""
    import copy
    from fprnn.training.objectives import Mazes
    x, y = mazes.collate([(k, mazes.draw(0, "train", 3, k)) for k in range(6)])
    options = dict(channels=4, head_channels=4, rule="bptt", sigma_W=1.0, max_norm=None, solver="iterate",
                   solver_kwargs={"max_iter": 5, "tol": 1e-9}, fallback=None, dtype="float64", bptt_steps=4)
    net = MazeNet(**options)
    ref = copy.deepcopy(net)
    objective = Mazes(progressive=0.3, seed=seed, progressive_iters=5)
    module = _one_step(net, x, y, objective=objective, unsettled="train")
    n, k = objective.drawn
    assert 0 <= n <= 4 and 1 <= k <= 5 - n and not module.last_step.skipped
    (0.7 * _bptt_reference_loss(ref, x, y, 0.0) + 0.3 * _progressive_reference(ref, x, y, n, k)).backward()
    for (name, after), before in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(after.detach(), (before - before.grad).detach(), atol=1e-12, rtol=0, msg=name)
    with pytest.raises(ValueError, match=r"progressive must be the progressive loss's weight α in \[0, 1\], got 2"):
        mazes.MazeDataModule(progressive=2)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_a_bptt_warmup_then_the_rule_is_the_two_runs_one_after_the_other(scale):
    """module.warmup_steps=2 with rule=w3: the first two steps are bptt's (η warmup_lr, unsettled mazes
    trained on), the third w3's — the same weights as two bptt steps, then one w3 step from them;
    rule_lr_scale: K's optimizer lr (SGD's 1 here) times it from the third step on, which under SGD
    is w3 with η times it."""
    import copy
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset
    from fprnn.training.module import FixedPointModule
    x, y = mazes.collate([(k, mazes.draw(0, "train", 3, k)) for k in range(9)])
    options = dict(channels=4, head_channels=4, rule="w3", sigma_W=1.0, max_norm=0.6, solver="iterate",
                   solver_kwargs={"max_iter": 300, "tol": 1e-11}, fallback=None, dtype="float64", bptt_steps=4)

    def fit(net, batches, **module_options):
        module = FixedPointModule(net, readin="gradient", **module_options)
        trainer = pl.Trainer(max_steps=len(batches), logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, limit_val_batches=0, enable_model_summary=False)
        data = TensorDataset(torch.cat([x[b] for b in batches]), torch.cat([y[b] for b in batches]))
        trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=3))
        return module

    thirds = [slice(0, 3), slice(3, 6), slice(6, 9)]
    scheduled = MazeNet(**options)
    two = copy.deepcopy(scheduled)
    module = fit(scheduled, thirds, rule="w3", lr=0.3, warmup_steps=2, warmup_lr=0.5, rule_lr_scale=scale)
    assert module.phase == "rule" and module.record.faults == 0
    assert [g["lr"] for g in module.optimizers().param_groups] == [scale, 1.0, 1.0]     # K, stem, head
    fit(two, thirds[:2], rule="bptt", lr=0.5, unsettled="train")
    after_bptt = copy.deepcopy(two.state_dict())
    fit(two, thirds[2:], rule="w3", lr=0.3 * scale)
    assert not torch.equal(after_bptt["layers.0.W"], two.state_dict()["layers.0.W"])     # w3 moved K
    for name, t in two.state_dict().items():
        torch.testing.assert_close(scheduled.state_dict()[name], t, atol=1e-12, rtol=0, msg=name)
    # the phase is the step count's (a resumed run's global_step picks it): bptt before k, the rule from k on
    fresh = FixedPointModule(MazeNet(**options), rule="w3", lr=0.3, warmup_steps=4, warmup_lr=0.5)
    for step, rule, eta in ((0, "bptt", 0.5), (3, "bptt", 0.5), (4, "w3", 0.3), (900, "w3", 0.3)):
        fresh.set_phase(fresh.phase_at(step))
        assert (fresh.model.layer.backward_rule.rule, fresh.model.layer.backward_rule.eta) == (rule, eta), step
    with pytest.raises(ValueError, match="warmup_steps=5 is a BPTT warm-up before a rule; rule=bptt"):
        FixedPointModule(MazeNet(channels=2, head_channels=2), rule="bptt", warmup_steps=5)
    with pytest.raises(ValueError, match=r"warmup_steps must be a non-negative integer \(BPTT steps before the rule, 0 = none\), got -1"):
        FixedPointModule(MazeNet(channels=2, head_channels=2), rule="w3", warmup_steps=-1)
    with pytest.raises(ValueError, match="rule_lr_scale=0.1 scales W's optimizer lr at the end of a warm-up"):
        FixedPointModule(MazeNet(channels=2, head_channels=2), rule="w3", rule_lr_scale=0.1)


@pytest.mark.parametrize("mu, mu_rho", [(0.0, 0.0), (0.5, 1.0)])
def test_a_bptt_step_leaves_nothing_of_the_last_one_alive(mu, mu_rho):
    """The report of a bptt step holds its unrolled state's graph (for the penalties), and the hook
    that records δ on that state holds the report: a strong reference would be a cycle through
    autograd's node that Python's collector cannot break, and every step's graph would stay (a
    4,000-step maze run grew to 11 GB). After the step, no earlier step's report is alive."""
    import gc
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset
    from fprnn.core.implicit import Report
    from fprnn.training.module import FixedPointModule
    x, y = mazes.collate([(k, mazes.draw(0, "train", 3, k)) for k in range(12)])
    net = MazeNet(channels=4, head_channels=4, rule="bptt", sigma_W=1.0, max_norm=None, solver="iterate",
                  solver_kwargs={"max_iter": 5, "tol": 1e-9}, fallback=None, bptt_steps=3)
    module = FixedPointModule(net, rule="bptt", lr=1.0, unsettled="train", settle_penalty=mu,
                              stability_penalty=mu_rho)
    alive = []

    class Count(pl.Callback):
        def on_train_batch_end(self, *args):
            gc.collect()
            alive.append(sum(isinstance(o, Report) for o in gc.get_objects()))
    trainer = pl.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, enable_model_summary=False, callbacks=[Count()])
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(x, y), batch_size=2))
    assert module.record.faults == 0 and alive == [1] * 6, alive
