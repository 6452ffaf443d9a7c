"""Loss landscapes around a weight matrix (the paper's Figure 1).

``python -m fprnn.analysis.landscape linear [--out DIR]``: the linear task of section 3.1 around the
minimum-norm minimiser W∗ (eq 3.3), along W(t) = W∗ + c t Z/√N (eq 3.5, five random lines) and on
the plane W(t1, t2) = W∗ + c (t1 Z1 + t2 Z2)/√N (eq 3.6), c = 2.5, with the paper's approximate
stability boundary |t| = √(1 − σw²)/c (dashed) and, on the plane, the exact one, max Re λ(W) = 1
(white).

``python -m fprnn.analysis.landscape RUN_DIR``: the same slices around a trained network's final W
(``FixedPointRNN.load(RUN_DIR)``, data from the run's config), with J = the mean loss of its
fixed points on a probe set; points whose fixed points do not converge are left blank.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from fprnn.analysis.figures import save_figure  # noqa: E402

Tensor = torch.Tensor


def line(J: Callable[[Tensor], float], W0: Tensor, Z: Tensor, c: float, ts) -> np.ndarray:
    """J(W0 + c t Z/√N) for t in ts (eq 3.5)."""
    N = W0.shape[0]
    return np.array([J(W0 + c * float(t) * Z / math.sqrt(N)) for t in ts])


def plane(J: Callable[[Tensor], float], W0: Tensor, Z1: Tensor, Z2: Tensor, c: float, ts) -> np.ndarray:
    """J(W0 + c (t1 Z1 + t2 Z2)/√N) on the grid ts × ts (eq 3.6); rows index t2, columns t1."""
    N = W0.shape[0]
    return np.array([[J(W0 + c * (float(a) * Z1 + float(b) * Z2) / math.sqrt(N)) for a in ts] for b in ts])


def linear_landscape(N: int = 200, m: int = 100, sigma_w: float = 0.5, c: float = 2.5, n_line: int = 201,
                     n_plane: int = 61, lines: int = 5, seed: int = 0) -> dict:
    """Both slices of the linear task's J (eq 3.1) around W∗ (eq 3.3), float64."""
    from fprnn.data.datamodules import LinearRegressionDataModule
    data = LinearRegressionDataModule(N=N, m=m, sigma_w=sigma_w, seed=seed)
    W_star = data.W_star()
    g = torch.Generator().manual_seed(seed + 7)
    ts_line = np.linspace(-1, 1, n_line)
    ts_plane = np.linspace(-1, 1, n_plane)
    Zs = [torch.randn(N, N, generator=g, dtype=torch.float64) for _ in range(lines)]
    Z1, Z2 = (torch.randn(N, N, generator=g, dtype=torch.float64) for _ in range(2))
    max_re = lambda W: float(torch.linalg.eigvals(W).real.max())   # noqa: E731  (J = (−I + W)/τ)
    return {"ts_line": ts_line, "lines": [line(data.loss, W_star, Z, c, ts_line) for Z in Zs],
            "ts_plane": ts_plane, "plane": plane(data.loss, W_star, Z1, Z2, c, ts_plane),
            "plane_max_re_eig": plane(max_re, W_star, Z1, Z2, c, ts_plane),
            "boundary": math.sqrt(1 - sigma_w ** 2) / c, "J_star": data.loss(W_star)}


def plot(land: dict, out: Path, title: str, cut: float = 1000.0) -> list[Path]:
    """Figure 1 A (lines, J cut at ``cut``) and B (plane, colour cut at ``cut``)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    b = land.get("boundary")
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for y in land["lines"]:
        ax.plot(land["ts_line"], np.minimum(y, cut), lw=1)
    if b:
        for s in (-b, b):
            ax.axvline(s, color="tab:blue", ls="--", lw=1)
    ax.set_xlabel("t")
    ax.set_ylabel(f"J(W(t)) (cut at {cut:g})")
    ax.set_title(f"{title}: random lines", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out, "landscape_line", written)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    ts = land["ts_plane"]
    im = ax.pcolormesh(ts, ts, np.minimum(land["plane"], cut), shading="auto", cmap="magma")
    fig.colorbar(im, ax=ax, label=f"J (cut at {cut:g})")
    if b:   # the paper's approximate boundary, from ρ(W(t)) ≈ √(σw² + c²|t|²)
        th = np.linspace(0, 2 * np.pi, 200)
        ax.plot(b * np.cos(th), b * np.sin(th), color="tab:cyan", ls="--", lw=1.2)
    if "plane_max_re_eig" in land:   # the exact one: max Re λ(W) = 1
        ax.contour(ts, ts, land["plane_max_re_eig"], levels=[1.0], colors="white", linewidths=1)
    ax.set_xlabel("t1")
    ax.set_ylabel("t2")
    ax.set_aspect("equal")
    ax.set_title(f"{title}: a random plane", fontsize=9)
    fig.tight_layout()
    save_figure(fig, out, "landscape_plane", written)
    return written


def run_landscape(run_dir: Path, n_line: int = 41, n_plane: int = 15, probe: int = 512, c: float = 1.0,
                  lines: int = 3, seed: int = 0) -> dict:
    """Slices of the mean loss of a trained network's fixed points around its final W."""
    import hydra

    from fprnn.models.dense import FixedPointRNN
    from fprnn.training.checkpoint import saved_config
    from fprnn.training.update import per_sample_loss
    cfg = saved_config(run_dir)
    model = FixedPointRNN.load(run_dir)
    data = hydra.utils.instantiate(cfg.data)
    task = data.task
    if task == "classification":
        data.setup()
        p, y = data.test_set.tensors[0][:probe], data.test_set.tensors[1][:probe]
    else:
        p, y = data.X, data.Y
    x = model.input(p.to(model.W.dtype))
    y = y if task == "classification" else y.to(model.W.dtype)

    @torch.no_grad()
    def J(W: Tensor) -> float:
        fp = model.fixed_point(x, W=W.to(model.W.dtype))
        if fp.solution.tol is not None and fp.solution.n_nonconverged:
            return float("nan")
        return float(per_sample_loss(task, model.readout(fp.r), y).mean())

    W0 = model.W.detach().double()
    g = torch.Generator().manual_seed(seed + 7)
    N = W0.shape[0]
    Zs = [torch.randn(N, N, generator=g, dtype=torch.float64) for _ in range(lines)]
    Z1, Z2 = (torch.randn(N, N, generator=g, dtype=torch.float64) for _ in range(2))
    ts_line, ts_plane = np.linspace(-1, 1, n_line), np.linspace(-1, 1, n_plane)
    return {"ts_line": ts_line, "lines": [line(J, W0, Z, c, ts_line) for Z in Zs],
            "ts_plane": ts_plane, "plane": plane(J, W0, Z1, Z2, c, ts_plane), "boundary": None}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", help="'linear' for the linear task, or a run directory")
    ap.add_argument("--out", default=None, help="output folder (default: figures/ in the run dir, "
                                                "or landscape/ for the linear task)")
    ap.add_argument("--n-line", type=int, default=None)
    ap.add_argument("--n-plane", type=int, default=None)
    ap.add_argument("--c", type=float, default=None, help="perturbation scale (paper: 2.5)")
    a = ap.parse_args(argv)
    if a.what == "linear":
        land = linear_landscape(c=a.c or 2.5, n_line=a.n_line or 201, n_plane=a.n_plane or 61)
        out = Path(a.out or "landscape")
        files = plot(land, out, "linear task (eq 3.1) around W*")
        print(f"J(W*) = {land['J_star']:.3g}; stability boundary |t| = {land['boundary']:.3f}")
    else:
        run = Path(a.what)
        if not (run / "weights.pt").exists():
            raise SystemExit(f"{run}: no weights.pt here (pass 'linear' or a run directory)")
        land = run_landscape(run, n_line=a.n_line or 41, n_plane=a.n_plane or 15, c=a.c or 1.0)
        files = plot(land, Path(a.out or run / "figures"), f"trained network ({run.name})")
    for f in files:
        print(f)


if __name__ == "__main__":
    main()
