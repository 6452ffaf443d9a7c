"""Figures from runs and sweeps: ``python -m fprnn.figures RUN_OR_SWEEP_DIR``.

Reads each run's ``results.json`` and ``csv/metrics.csv`` and writes PNG and PDF files into
``RUN_OR_SWEEP_DIR/figures/``: loss (and accuracy) against step, one line per learning rate, one
panel per rule (the paper's Figures 2, 4, 5); the angles between rules against step (Figure 3);
the angle of the applied update to −∇L and the spread of per-sample step norms;
the stability of the probed fixed points and max Re λ(W) against step; and the eigenvalues of each final W.
For a network in time (model=ctrnn): loss and performance against step, and for one run the
psychometric curves, example trials, trajectories and fixed points ([`fprnn.analysis.trial_figures`][fprnn.analysis.trial_figures]).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def _eig_panel(ax, W: torch.Tensor, continuous: bool, s: float = 6) -> None:
    """eig(W) in the complex plane with W's own stability boundary: Re λ = 1 for continuous-time
    dynamics, |λ| = 1 for the discrete map."""
    lam = torch.linalg.eigvals(W.detach().cpu().double())
    ax.scatter(lam.real.numpy(), lam.imag.numpy(), s=s, alpha=0.7)
    if continuous:
        ax.axvline(1.0, color="tab:red", ls="--", lw=1, label="Re λ = 1")
    else:
        t = torch.linspace(0, 2 * math.pi, 200)
        ax.plot(torch.cos(t), torch.sin(t), color="tab:red", ls="--", lw=1, label="|λ| = 1")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")
    ax.legend(loc="upper left", fontsize=7)


def eig_figure(W: torch.Tensor, continuous: bool = True, title: str = "eigenvalues of W"):
    """Complex-plane scatter of eig(W) with the stability boundary of W itself."""
    fig, ax = plt.subplots(figsize=(4.2, 4))
    _eig_panel(ax, W, continuous)
    ax.set_title(title)
    ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    return fig


def read_metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """metric name → [(step, value)] from a run's CSV log."""
    path = run / "csv" / "metrics.csv"
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    if not path.exists():
        return out
    with path.open() as fh:
        for row in csv.DictReader(fh):
            step = int(float(row.get("step") or 0))
            for k, v in row.items():
                if k in ("step", "epoch") or v in ("", None):
                    continue
                try:
                    out[k].append((step, float(v)))
                except ValueError:
                    pass
    return out


def find_runs(root: Path) -> list[Path]:
    """The run directories under root (root itself if it is one), sorted."""
    if (root / "results.json").exists():
        return [root]
    return sorted(p.parent for p in root.rglob("results.json") if "figures" not in p.parts)


def load(runs: list[Path]) -> list[dict]:
    out = []
    for run in runs:
        res = json.loads((run / "results.json").read_text())
        out.append({"dir": run, "res": res, "metrics": read_metrics(run)})
    return out


def _by_rule(items):
    groups = defaultdict(list)
    for it in items:
        groups[it["res"].get("rule", "?")].append(it)
    for g in groups.values():
        g.sort(key=lambda it: float(it["res"].get("lr") or 0))
    return dict(sorted(groups.items()))


def _panels(groups, title):
    n = max(len(groups), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
    fig.suptitle(title)
    return fig, axes[0]


def save_figure(fig, out: Path, name: str, written: list[Path]) -> None:
    """Write ``fig`` as ``out/name.png`` and ``.pdf``, add both paths to ``written``, and close it."""
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        fig.savefig(p, dpi=120)
        written.append(p)
    plt.close(fig)


def plot_curves(items, key: str, ylabel: str, name: str, out: Path, written: list, log: bool = False,
                marker: str | None = None, hline: tuple[float, str] | None = None) -> None:
    groups = _by_rule([it for it in items if it["metrics"].get(key)])
    if not groups:
        return
    fig, axes = _panels(groups, ylabel)
    cmap = plt.get_cmap("viridis")
    for ax, (rule, runs) in zip(axes, groups.items()):
        for i, it in enumerate(runs):
            pts = [(s, v) for s, v in it["metrics"][key] if math.isfinite(v) and (v > 0 or not log)]
            if not pts:
                continue
            s, v = zip(*pts)
            status = it["res"].get("status", "")
            label = f"η={it['res'].get('lr')}" + ("" if status == "finished" else f" ({status})")
            ax.plot(s, v, color=cmap(i / max(len(runs) - 1, 1)), lw=1.2, marker=marker, ms=3, label=label)
        if hline:
            ax.axhline(hline[0], color="k", ls="--", lw=0.8, label=hline[1])
        ax.set_title(f"rule {rule}")
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0].set_ylabel(ylabel)
    fig.tight_layout()
    save_figure(fig, out, name, written)


LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 3)))
MARKERS = ("o", "s", "^", "v", "D", "x")


def plot_angles(items, out: Path, written: list) -> None:
    items = [it for it in items if any(k.startswith("angle/theta") for k in it["metrics"])]
    if not items:
        return
    n = len(items)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.4), squeeze=False, sharey=True)
    fig.suptitle("angles between rules (section 3.1.6)")
    for ax, it in zip(axes[0], items):
        keys = sorted(k for k in it["metrics"] if k.startswith("angle/theta"))
        for i, k in enumerate(keys):
            # angles often coincide (θ12 = θ13 = θ14 on the linear task): each line gets its own
            # style and marker, so that one drawn over another still shows
            s, v = zip(*it["metrics"][k])
            ax.plot(s, v, lw=1.2, ls=LINESTYLES[i % len(LINESTYLES)], marker=MARKERS[i % len(MARKERS)],
                    ms=4, markevery=max(len(s) // 12, 1), mfc="none", label=f"θ{k[len('angle/theta'):]}")
        ax.set_title(f"{it['res'].get('rule')} η={it['res'].get('lr')}")
        ax.set_xlabel("step")
        ax.set_ylim(0, 180)
        ax.axhline(90, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("angle (degrees)")
    fig.tight_layout()
    save_figure(fig, out, "angles", written)


def plot_eigs(items, out: Path, written: list) -> None:
    """eig of every run's final W — of each layer's, for a stack."""
    panels = []
    for it in items:
        if (it["dir"] / "weights.pt").exists():
            w = torch.load(it["dir"] / "weights.pt", map_location="cpu")
            Ws = [w[k] for k in sorted((k for k in w if k.startswith("layers.") and k.endswith(".W")),
                                       key=lambda k: int(k.split(".")[1]))]
            panels += [(it, l if len(Ws) > 1 else None, W) for l, W in enumerate(Ws)]
    if not panels:
        return
    n = len(panels)
    cols = min(n, 5)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows + 0.4), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, (it, l, W) in zip(axes.flat, panels):
        _eig_panel(ax, W, continuous=it["res"].get("dynamics") != "discrete", s=4)
        layer = "" if l is None else f", layer {l}"
        ax.set_title(f"{it['res'].get('rule')} η={it['res'].get('lr')}{layer}", fontsize=9)
    fig.suptitle("eigenvalues of the final W" if n > 1 else "eig(final W)")
    fig.tight_layout()
    save_figure(fig, out, "eig_W", written)


def plot_responses(items, out: Path, written: list, n_units: int = 4) -> None:
    """Fitted against recorded responses on the held-out stimuli, for runs that fit recorded
    responses: a scatter of all of them, and for a few recorded units their tuning curve at the
    highest contrast and contrast-response curve at their best orientation (``data=ssn_teacher``;
    other responses data: the responses over the test stimuli in file order)."""
    import hydra

    from fprnn.models.dense import FixedPointRNN
    from fprnn.training.checkpoint import saved_config
    for it in items:
        d = it["dir"]
        if it["res"].get("data") not in ("responses", "ssn_teacher") or not (d / "model.json").exists():
            continue
        try:
            data = hydra.utils.instantiate(saved_config(d).data)
        except FileNotFoundError:
            continue
        net = FixedPointRNN.load(d)
        X, R = data.test_set.tensors
        fit = net.fixed_points(X)[-1].r[:, data.units].float()
        R = R.float()
        units = torch.linspace(0, R.shape[1] - 1, n_units).round().long()
        grid = hasattr(data, "contrasts")
        fig, axes = plt.subplots(1 + grid, n_units + 1, figsize=(3.0 * (n_units + 1), 2.8 * (1 + grid)),
                                 squeeze=False)
        ax = axes[0, 0]
        ax.scatter(R.flatten(), fit.flatten(), s=3, alpha=0.4)
        hi = float(max(R.max(), fit.max()))
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_xlabel("recorded rate")
        ax.set_ylabel("fitted rate")
        ax.set_title(f"held-out stimuli, R² = {it['res'].get('test_r2', float('nan')):.3f}", fontsize=9)
        for j, u in enumerate(units.tolist(), start=1):
            if grid:
                nc, no = len(data.contrasts), data.n_orient
                rec, fitted = R[:, u].reshape(nc, no), fit[:, u].reshape(nc, no)
                best = int(rec[-1].argmax())
                axes[0, j].plot(rec[-1], "o", ms=3, label="recorded")
                axes[0, j].plot(fitted[-1], "-", label="fitted")
                axes[0, j].set_title(f"unit {int(data.units[u])}: tuning, c = {data.contrasts[-1]:g}", fontsize=9)
                axes[0, j].set_xlabel("orientation index")
                axes[1, j].plot(data.contrasts, rec[:, best], "o", ms=3, label="recorded")
                axes[1, j].plot(data.contrasts, fitted[:, best], "-", label="fitted")
                axes[1, j].set_xscale("log")
                axes[1, j].minorticks_off()
                axes[1, j].set_xticks(data.contrasts, [f"{c:g}" for c in data.contrasts])
                axes[1, j].set_xlabel("contrast")
                axes[1, j].set_title("contrast response (best orientation)", fontsize=9)
            else:
                axes[0, j].plot(R[:, u], "o", ms=3, label="recorded")
                axes[0, j].plot(fit[:, u], "-", label="fitted")
                axes[0, j].set_title(f"unit {int(data.units[u])}", fontsize=9)
                axes[0, j].set_xlabel("test stimulus")
        axes[0, 1].legend(fontsize=7)
        for ax in axes[1:, 0]:
            ax.axis("off")
        fig.tight_layout()
        save_figure(fig, out, f"responses_{d.name}" if len(items) > 1 else "responses", written)


def make_figures(root: str | Path, wandb: bool = False) -> list[Path]:
    """Write the figures of one run or a sweep into ``root/figures``; return the files."""
    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run under {root}: expected results.json in it or its subfolders")
    items = load(runs)
    out = root / "figures"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if any("start" in it["res"] for it in items):     # networks in time (model=ctrnn)
        plot_curves(items, "train/loss_step", "training loss (weighted over steps)", "loss", out, written, log=True)
        score = "r2" if any(it["res"].get("targets") == "continuous" for it in items) else "perf"
        label = "R²" if score == "r2" else "performance"
        plot_curves(items, f"train/{score}_step", f"training {label}", "performance", out, written)
        plot_curves(items, f"val/{score}", f"validation {label} (end of epoch)", "val_performance", out, written,
                    marker="o")
        if len(items) == 1:
            from fprnn.analysis.trial_figures import plot_trials
            plot_trials(items[0]["dir"], out, written, save_figure)
        return written
    task = next((it["res"].get("task") for it in items if it["res"].get("task")), None)
    regression = task == "regression"
    plot_curves(items, "train/loss_step", "J(W) (training loss)" if regression else "training loss",
                "loss", out, written, log=True)
    if not regression:
        plot_curves(items, "train/acc_step", "training accuracy", "accuracy", out, written)
        plot_curves(items, "val/acc", "validation accuracy (end of epoch)", "val_accuracy", out, written, marker="o")
    else:
        plot_curves(items, "val/r2", "validation R² (recorded units)", "val_r2", out, written, marker="o")
        plot_responses(items, out, written)
    plot_curves(items, "stability/max_re_eig", "max over probes of max Re λ(G_i W)", "stability", out, written,
                hline=(1.0, "stability boundary"))
    plot_curves(items, "stability/max_re_eig_W", "max Re λ(W) (the authors' check)", "stability_W", out,
                written, hline=(1.0, "stability boundary"))
    plot_angles(items, out, written)
    plot_curves(items, "angle/applied_vs_gradient", "angle of the applied update to −∇L (degrees)",
                "descent_angle", out, written, marker="o", hline=(90.0, "no descent beyond"))
    plot_curves(items, "angle/step_norm_spread", "per-sample step norms: max / median", "step_spread", out,
                written, log=True, marker="o")
    plot_eigs(items, out, written)
    if wandb:
        _log_to_wandb(root, [p for p in written if p.suffix == ".png"])
    return written


def _log_to_wandb(root: Path, pngs: list[Path]) -> None:
    import os

    import wandb
    run = wandb.init(project="fprnn", job_type="figures", name=f"figures:{root.name}",
                     dir=str(root), mode=os.environ.get("WANDB_MODE", "offline"))
    run.log({f"figures/{p.stem}": wandb.Image(str(p)) for p in pngs})
    run.finish()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", help="a run directory (with results.json) or a sweep directory")
    ap.add_argument("--wandb", action="store_true", help="also log the images to W&B (offline by default)")
    a = ap.parse_args(argv)
    for p in make_figures(a.dir, wandb=a.wandb):
        print(p)


if __name__ == "__main__":
    main()
