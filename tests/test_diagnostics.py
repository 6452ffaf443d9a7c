"""Monitors, landscape and figures."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fprnn.core import reference as ref
from fprnn.core import rules
from fprnn.analysis.figures import make_figures, read_metrics
from fprnn.analysis.landscape import linear_landscape, plot
from fprnn.training.run import build, train

from helpers import QUICK_MNIST, make_cfg

ROOT = Path(__file__).resolve().parents[1]


def test_angles_on_the_linear_task_match_the_paper_and_an_independent_reference(tmp_path):
    """Figure 3: θ12 between 60° and 90°, θ23 below 10°, while w2 learns with η = 1."""
    cfg = make_cfg(["experiment=paper_linear", "rule=w2", "lr=1", "logger=csv", "progress_bar=false",
                    "trainer.max_steps=300", "callbacks.angles.every_n_steps=25"], tmp_path)
    train(cfg)
    m = read_metrics(tmp_path)
    steps = [s for s, _ in m["angle/theta12"]]
    assert steps[:3] == [1, 25, 50] and len(steps) == 13
    assert all(60 < v < 90 for _, v in m["angle/theta12"])
    assert all(v < 10 for _, v in m["angle/theta23"])
    # step 1's angles were taken at the initial W: recompute them with the per-sample formulas
    data, model, *_ = build(cfg, tmp_path / "ref")
    W0, X, Y = model.W.detach(), data.X, data.Y
    R = torch.linalg.solve(torch.eye(200, dtype=W0.dtype) - W0, X.T).T
    D = 2 * (R - Y)
    ones = torch.ones_like(R)
    d1 = ref.w1(W0, R, ones, D, 1.0)
    d2 = ref.w2_linear_batch(W0, X, D, 1.0)
    d3 = ref.w3(W0, R, ones, D, 1.0)
    assert m["angle/theta12"][0][1] == pytest.approx(rules.angle(d1, d2), abs=1e-3)
    assert m["angle/theta23"][0][1] == pytest.approx(rules.angle(d2, d3), abs=1e-3)
    norm = {k: v for k, v in m.items() if k.startswith("angle/norm_w1")}
    assert norm["angle/norm_w1"][0][1] == pytest.approx(float(torch.linalg.norm(d1)), rel=1e-5)
    # SGD with lr 1 applies ΔW2 itself: its angle to −∇L (w1's direction) is θ12
    assert m["angle/applied_vs_gradient"][0][1] == pytest.approx(rules.angle(d2, d1), abs=1e-3)
    # the per-sample steps of w2 (eq 2.17, one sample at a time) and their spread
    each = torch.stack([torch.linalg.norm(ref.w2(W0, R[i:i + 1], ones[:1], D[i:i + 1], 1.0)) for i in range(len(R))])
    assert m["angle/step_norm_max"][0][1] == pytest.approx(float(each.max()), rel=1e-6)
    assert m["angle/step_norm_spread"][0][1] == pytest.approx(float(each.max() / each.median()), rel=1e-6)


def test_stability_and_solver_monitors_log_their_scalars(tmp_path, mnist_dir):
    cfg = make_cfg([*QUICK_MNIST, "callbacks.stability.every_n_steps=2", "data.batch_size=128"],
                   tmp_path, mnist_dir)
    res = train(cfg)
    m = read_metrics(tmp_path)
    for key in ("stability/max_re_eig", "stability/frac_stable", "stability/spectral_radius_W",
                "solver/iters", "solver/max_residual", "solver/nonconverged"):
        assert m.get(key), key
    assert [s for s, _ in m["stability/max_re_eig"]] == [2, 4, 6, 8]
    assert len(m["solver/iters"]) == 8 and all(v <= 1e-5 for _, v in m["solver/max_residual"])
    # the last probe is taken at the final W, as results.json's
    assert m["stability/max_re_eig"][-1][1] == pytest.approx(res["max_re_eig"], rel=1e-5)
    # the worst value seen during training, and where
    worst_step, worst = max(m["stability/max_re_eig"], key=lambda sv: sv[1])
    assert res["peak_max_re_eig"] == pytest.approx(max(worst, res["max_re_eig"]), rel=1e-5)
    assert res["peak_step"] in (worst_step, res["steps"])
    assert res["min_frac_stable"] == min(v for _, v in m["stability/frac_stable"])
    assert res["peak_max_re_eig_W"] == pytest.approx(
        max(max(v for _, v in m["stability/max_re_eig_W"]), res["max_re_eig_W"]), rel=1e-5)


def test_linear_landscape_is_small_inside_and_singular_outside(tmp_path):
    land = linear_landscape(n_line=51, n_plane=31, lines=1)
    P, ts, b = land["plane"], land["ts_plane"], land["boundary"]
    assert b == pytest.approx(math.sqrt(0.75) / 2.5)
    assert np.isfinite(P).all() and land["J_star"] < 1e-20
    S = land["plane_max_re_eig"]
    assert S[15, 15] < 0.6 and S.max() > 1           # the centre W* is stable, corners are not
    # Small where W is well inside the stability region; singular ridges where it is unstable.
    # (J ∝ 1/|1 − λ|² grows without bound as an eigenvalue approaches 1, so no bound can hold
    # right up to the boundary.)
    well_inside = S < 0.8
    assert well_inside.sum() > 30 and P[well_inside].max() < 10
    assert P[S > 1].max() > 1000
    T1, T2 = np.meshgrid(ts, ts)
    assert P[np.hypot(T1, T2) < 0.7 * b].max() < 10   # and inside 0.7 × the paper's circle
    files = plot(land, tmp_path, "linear")
    assert {f.name for f in files} >= {"landscape_line.png", "landscape_plane.png"}


def _check_png(path: Path):
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert img.shape[0] > 200 and img.shape[1] > 300, path
    assert img.std() > 5, f"{path} looks blank"


def test_figures_for_a_run_and_for_a_sweep(tmp_path, mnist_dir):
    for lr in ("0.1", "0.25"):
        train(make_cfg([*QUICK_MNIST, f"lr={lr}", "callbacks.angles.every_n_steps=1"],
                       tmp_path / "sweep" / f"w3_lr{lr}", mnist_dir))
    one = make_figures(tmp_path / "sweep" / "w3_lr0.1")
    names = {p.name for p in one}
    assert {"loss.png", "accuracy.png", "angles.png", "eig_W.png", "loss.pdf", "descent_angle.png",
            "step_spread.png"} <= names
    both = make_figures(tmp_path / "sweep")
    assert all(p.parent == tmp_path / "sweep" / "figures" for p in both)
    for p in [*one, *both]:
        assert p.stat().st_size > 1000
        if p.suffix == ".png":
            _check_png(p)
    out = subprocess.run([sys.executable, "-m", "fprnn.figures", str(tmp_path / "sweep")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "loss.png" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fprnn.figures", str(tmp_path / "nothing")], cwd=ROOT,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no run under" in bad.stderr


def test_figure_titles_fit_and_coinciding_lines_stay_distinguishable(tmp_path, mnist_dir, monkeypatch):
    """Every figure drawn: each title's text box lies inside the canvas; in the angle panels no
    two lines share a style (on the linear task θ12, θ13, θ14 coincide)."""
    import fprnn.analysis.figures as figures
    train(make_cfg([*QUICK_MNIST, "callbacks.angles.every_n_steps=1", "callbacks.stability.every_n_steps=2"],
                   tmp_path / "mnist", mnist_dir))
    train(make_cfg(["experiment=paper_linear", "progress_bar=false", "logger=csv", "rule=w2", "lr=0.3",
                    "trainer.max_steps=12", "callbacks.angles.every_n_steps=2"], tmp_path / "linear"))
    drawn, curves = {}, {}
    save = figures.save_figure

    def check(fig, out, name, written):
        fig.canvas.draw()
        r, box = fig.canvas.get_renderer(), fig.bbox
        titles = [t for t in [fig._suptitle, *(ax.title for ax in fig.axes)] if t is not None and t.get_text()]
        assert titles, name
        for t in titles:
            bb = t.get_window_extent(r)
            assert box.x0 <= bb.x0 and bb.x1 <= box.x1 and box.y0 <= bb.y0 and bb.y1 <= box.y1, (name, t.get_text())
        drawn[name] = [[(ln.get_linestyle(), ln.get_marker()) for ln in ax.get_lines() if
                        ln.get_label().startswith("θ")] for ax in fig.axes]
        curves.setdefault(name, []).append([(ln.get_label(), list(ln.get_xdata()), list(ln.get_ydata()))
                                            for ax in fig.axes for ln in ax.get_lines()])
        save(fig, out, name, written)

    monkeypatch.setattr(figures, "save_figure", check)
    for run in ("mnist", "linear"):
        figures.make_figures(tmp_path / run)
    assert {"loss", "accuracy", "stability", "stability_W", "angles", "eig_W"} <= set(drawn)
    styles = drawn["angles"][0]
    assert len(styles) == 6 and len(set(styles)) == 6        # θ12 … θ34, each its own style
    # what is drawn is what the run logged: the MNIST run's loss curve is its CSV's train/loss_step
    import csv
    rows = [r for r in csv.DictReader(open(tmp_path / "mnist" / "csv" / "metrics.csv")) if r.get("train/loss_step")]
    (label, xs, ys), = [c for c in curves["loss"][0] if c[0].startswith("η=")]
    assert xs == [int(float(r["step"])) for r in rows]
    assert ys == pytest.approx([float(r["train/loss_step"]) for r in rows], rel=1e-12)
