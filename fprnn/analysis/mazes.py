"""How a trained maze network does: whole-maze and pixel accuracy at the training size and larger
ones, accuracy against the solver's budget, path independence (random starts against rest), and
the figure of mazes with the fixed point's channels that carry the path."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from fprnn.core.checks import positive_int
from fprnn.data.mazes import MazeDataModule, collate

Tensor = torch.Tensor


#: iteration budgets of the accuracy-against-settling curve (iterations of the solver from rest)
BUDGETS = (1, 2, 5, 10, 20, 50, 100, 200, 400)


@torch.no_grad()
def evaluate(net, x: Tensor, y: Tensor, batch: int = 250, u0: str = "rest", seed: int = 0,
             budget: dict | None = None) -> dict:
    """``net``'s answers on mazes x (n, 3, H, W) with paths y (n, H, W): ``maze_acc`` (every pixel
    right), ``pixel_acc``, the solver's mean ``iterations`` and the ``unconverged`` count, solved from
    ``u0`` = ``rest`` or ``random`` (uniform in (−1, 1), seeded) with ``budget`` (the layer's own by
    default, [`ConvFixedPointLayer.fixed_point`][fprnn.models.conv.ConvFixedPointLayer.fixed_point]);
    with ``fixed_points`` the rows."""
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    right = pixels = iters = unconverged = 0
    rows = []
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        start = None
        if u0 == "random":
            start = torch.rand(len(xb), net.layer.channels, *xb.shape[2:], generator=gen, dtype=net.dtype) * 2 - 1
        pred = net(xb, start, budget).argmax(1)
        ok = pred == yb.to(pred.device)
        right += int(ok.flatten(1).all(1).sum())
        pixels += int(ok.sum())
        sol = net.layer.report.fixed_point.solution
        iters += float(sol.iters.float().sum())
        unconverged += int(sol.n_nonconverged)
        rows.append(net.layer.report.fixed_point.r)
    n = len(x)
    return {"maze_acc": right / n, "pixel_acc": pixels / y.numel(), "iterations": iters / n,
            "unconverged": unconverged, "fixed_points": torch.cat(rows)}


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "fixed_points"}


@torch.no_grad()
def solve_options(net, method: str | None, max_iter: int) -> dict:
    """A budget of ``max_iter`` iterations of ``method`` (the layer's own solver for None; another
    takes its defaults and the layer's tolerance) and no fallback."""
    if method is None or method == net.layer.solver_name:
        return {"solver": {**net.layer.solver_kwargs, "max_iter": max_iter}, "fallback": None}
    tol = net.layer.solver_kwargs.get("tol", 1e-5)
    return {"solver": {"tol": tol, "max_iter": max_iter}, "fallback": None, "method": method}


def settling_curve(net, x: Tensor, y: Tensor, budgets=BUDGETS, batch: int = 250,
                   method: str | None = None) -> dict[int, dict]:
    """After each of ``budgets`` iterations of the layer's solver (or ``method``) from rest (no
    fallback): the whole-maze accuracy, the share of mazes settled (within the solver's tolerance)
    and the seconds of solving a maze has taken. Each batch is solved once, continued from where the
    last budget stopped: for (damped) iteration, whose state is all it carries, that is the same
    iteration as a fresh solve with the larger budget, so the curve costs its largest budget rather
    than their sum (an accelerated solver restarts its history at each budget)."""
    budgets = sorted({positive_int("budget", b) for b in budgets})
    net.eval()
    right, settled, seconds = ({b: 0.0 for b in budgets} for _ in range(3))
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        u, done, spent = None, 0, 0.0
        for b in budgets:
            t0 = time.perf_counter()
            out = net(xb, u, solve_options(net, method, b - done))
            spent += time.perf_counter() - t0
            sol = net.layer.report.fixed_point.solution
            right[b] += int((out.argmax(1) == yb.to(out.device)).flatten(1).all(1).sum())
            settled[b] += int(sol.converged.sum())
            seconds[b] += spent
            u, done = net.layer.maps(sol.u, tuple(xb.shape[2:])), b
    n = len(x)
    return {b: {"maze_acc": right[b] / n, "settled": settled[b] / n, "seconds_per_maze": seconds[b] / n}
            for b in budgets}


@torch.no_grad()
def same_fixed_point(net, x: Tensor, method: str, max_iter: int, batch: int = 250, atol: float = 1e-3) -> dict:
    """Does ``method`` (e.g. Anderson) reach the fixed point that the layer's own solver reaches from
    rest? Both solve every maze with ``max_iter`` iterations; of the mazes both settled, the share
    whose states differ by at most ``atol`` at every unit (``same_state``) and whose answers are
    the same at every pixel (``same_answer``). An accelerated solve is of use at test time only
    where it returns the network's own fixed point: an input can have several."""
    net.eval()
    both = same_state = same_answer = 0
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        out = []
        for m in (None, method):
            pred = net(xb, None, solve_options(net, m, max_iter)).argmax(1)
            fp = net.layer.report.fixed_point
            out.append((pred, fp.r, fp.solution.converged))
        (p0, r0, c0), (p1, r1, c1) = out
        ok = c0 & c1
        both += int(ok.sum())
        same_state += int((ok & ((r0 - r1).abs().amax(1) <= atol)).sum())
        same_answer += int((ok & (p0 == p1).flatten(1).all(1)).sum())
    return {"both_settled": both / len(x), "same_state": same_state / max(both, 1),
            "same_answer": same_answer / max(both, 1)}


def budget_curve(net, x: Tensor, y: Tensor, budgets=BUDGETS) -> dict:
    """Maze accuracy when the solver from rest stops after each budget of iterations (no fallback):
    does more settling solve larger mazes? (`settling_curve`'s accuracies.)"""
    return {b: point["maze_acc"] for b, point in settling_curve(net, x, y, budgets).items()}


def stacked(ds) -> tuple[Tensor, Tensor]:
    return collate([ds[i] for i in range(len(ds))])


def maze_report(net, data: MazeDataModule, run_dir: Path | None = None, log=print) -> dict:
    """After training: the test mazes of the training size and of every ``test_cells`` size —
    accuracy, solver iterations, the accuracy-against-budget curve, and path independence (the fixed
    points and answers from random starts against those from rest) — and two figures: mazes.png
    (mazes, answers, the fixed point's most varied channels) and settling.png (accuracy against
    iterations, a line per size)."""
    out: dict = {"extrapolation": {}, "budget_curve": {}, "path_independence": {}}
    sizes = [data.cells, *data.test_cells]
    shown = {}
    for c in sizes:
        t0 = time.perf_counter()
        n = data.test_mazes if c == data.cells else data.test_mazes_large
        x, y = stacked(data.mazes("test", c, n))
        rest = evaluate(net, x, y)
        rand = evaluate(net, x, y, u0="random")
        gap = (rest["fixed_points"] - rand["fixed_points"]).abs().amax(1)
        out["extrapolation"][c] = {**public(rest), "side": 2 * c + 1, "mazes": n}
        out[f"maze_acc_{c}"] = rest["maze_acc"]       # flat, for the sweep's table
        out[f"settled_{c}"] = 1 - rest["unconverged"] / n
        out[f"path_independent_{c}"] = float((gap < 1e-3).float().mean())
        out["path_independence"][c] = {"maze_acc_from_random": rand["maze_acc"],
                                       "max_state_gap": float(gap.max()),
                                       "same_fixed_point": out[f"path_independent_{c}"]}
        out["budget_curve"][c] = budget_curve(net, x[:200], y[:200])
        shown[c] = (x[:3], y[:3])
        log(f"mazes of {c} cells ({2 * c + 1}×{2 * c + 1}): maze acc {rest['maze_acc']:.3f}, pixel acc "
            f"{rest['pixel_acc']:.4f}, {rest['iterations']:.0f} iterations; from random starts "
            f"{rand['maze_acc']:.3f} (largest state gap {float(gap.max()):.2g}) [{time.perf_counter() - t0:.0f} s]")
    if run_dir is not None:
        out["maze_figure"] = str(figure(net, shown, Path(run_dir) / "mazes.png"))
        out["settling_figure"] = str(curve_figure(out["budget_curve"], Path(run_dir) / "settling.png"))
    return out


@torch.no_grad()
def figure(net, shown: dict, path: Path, channels: int = 3) -> Path:
    """Mazes (open pixels grey, start green, goal red), their path, the prediction and the
    ``channels`` channels of the fixed point r∗ that vary most across the maze's pixels (a saturated
    channel is one colour and shows nothing), a row per maze, for each size in ``shown``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(c, x[i:i + 1], y[i]) for c, (x, y) in shown.items() for i in range(len(x))]
    cols = 3 + channels
    fig, axes = plt.subplots(len(rows), cols, figsize=(2 * cols, 2 * len(rows)), squeeze=False)
    for ax_row, (c, x, y) in zip(axes, rows):
        pred = net(x).argmax(1)[0]
        r = net.layer.maps(net.layer.report.fixed_point.r, tuple(x.shape[2:]))[0]
        img = np.stack([x[0, 0] * 0.6 + x[0, 2] * 0.4, x[0, 0] * 0.6 + x[0, 1] * 0.4, x[0, 0] * 0.6], -1)
        panels = [(img, None, f"{c} cells"), (y, "gray", "path"),
                  (pred, "gray", "prediction" + (" ✓" if bool((pred == y).all()) else " ✗"))]
        varied = r.flatten(1).var(1).argsort(descending=True)[:channels].tolist()
        panels += [(r[k], "RdBu_r", f"r∗ channel {k}") for k in varied]
        for ax, (a, cmap, title) in zip(ax_row, panels):
            ax.imshow(np.asarray(a, dtype=float), cmap=cmap, vmin=None if cmap != "RdBu_r" else -1,
                      vmax=None if cmap != "RdBu_r" else 1, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def curve_figure(curves: dict, path: Path) -> Path:
    """Whole-maze accuracy (solid) and the share settled (dashed, where recorded) against the
    solver's iterations, a line per maze size: ``curves`` {cells: {iterations: accuracy, or a
    `settling_curve` point}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for c, curve in sorted(curves.items(), key=lambda kv: int(kv[0])):
        its = sorted(curve, key=int)
        points = [curve[b] if isinstance(curve[b], dict) else {"maze_acc": curve[b]} for b in its]
        line, = ax.plot([int(b) for b in its], [p["maze_acc"] for p in points], marker="o", ms=3,
                        label=f"{c} cells ({2 * int(c) + 1} px)")
        if all("settled" in p for p in points):
            ax.plot([int(b) for b in its], [p["settled"] for p in points], ls="--", color=line.get_color(), lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("iterations from rest")
    ax.set_ylabel("whole-maze accuracy (dashed: settled)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
