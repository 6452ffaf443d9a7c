"""What a run tells its user on the console: its result at the end, and nothing that is not for them.

[`summary`][fprnn.training.console.summary] is the few lines every run ends with (finished, diverged, no_progress,
interrupted, failed): status, the test metric of the network kept (and of the last one when they
differ) with its epoch, faults and unconverged samples, peak stability, wall time, the run
directory. [`quiet`][fprnn.training.console.quiet] silences, narrowly and at their source, third-party messages a user can
neither act on nor needs; ``verbose=true`` (or ``HYDRA_FULL_ERROR=1``) leaves everything on.
"""
from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

from hydra.experimental.callback import Callback
from pytorch_lightning.loggers import WandbLogger as _WandbLogger

#: test metrics in the order a summary names them: (results key, label)
METRICS = (("test_perf", "test perf"), ("test_acc", "test acc"), ("test_r2", "test R²"), ("loss_W", "J(W)"),
           ("test_loss", "test loss"))


class _DropTips(logging.Filter):
    """Lightning's advertisements for its cloud products (logged as info at every Trainer)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip:")


_TIPS = _DropTips()
_QUIET = False


def quiet() -> None:
    """Silence third-party noise for this process (idempotent)."""
    global _QUIET
    _QUIET = True
    from lightning_utilities.core import rank_zero
    rank_zero.log.addFilter(_TIPS)
    # torch deprecated pytree's LeafSpec; Lightning's own _pytree still asks for it (not the user's call)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"pytorch_lightning\.utilities\._pytree")


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger without the ``anonymous`` init setting when it is unset (Lightning
    always passes it, None, and W&B warns at every run that the setting has no effect); after
    [`quiet`][fprnn.training.console.quiet], W&B does not print its run's history table at the end (the run's summary is
    fprnn's, [`summary`][fprnn.training.console.summary]; the history is in the run)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
        if _QUIET:
            self._wandb_init.setdefault("settings", {"quiet": True})


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def summary(results: dict) -> list[str]:
    """The lines a run ends with (see the module docstring)."""
    head = f"fprnn: {results.get('status')}"
    if results.get("wall_s") is not None:
        head += f" in {results['wall_s']:.0f} s"
    lines = [head]
    kept = "best" if results.get("weights") == "best" else "last"
    for key, label in METRICS:
        if results.get(key) is None:
            continue
        line = f"  {label} {_fmt(results[key])}"
        if key.startswith("test_") and kept == "best":
            line += f" (the best validation network, epoch {results.get('best_epoch', -1) + 1} of {results.get('epochs')})"
            last = results.get(f"last_{key}")
            if last is not None and last != results[key]:
                line += f"; the last network {_fmt(last)}"
        elif key.startswith("test_"):
            line += f" (the last network, after {results.get('epochs')} epochs)"
        lines.append(line)
        break
    if "attempted_steps" in results:
        faults = f"  faults {results.get('faults', 0)} of {results['attempted_steps']} attempted steps"
        if "start_from_rest" in results:
            faults += (f" · trials started from rest {results['start_from_rest']} unconverged, "
                       f"{results.get('start_unstable', 0)} unstable")
        elif results.get("unconverged") is not None:
            done = "trained on" if results.get("unsettled") == "train" else "left out"
            faults += f" · unconverged samples {done} {results['unconverged']}"
        stability = results.get("start_stability_max", results.get("peak_max_re_eig"))
        if stability is not None:
            faults += f" · peak stability {_fmt(stability)} (< 1 stable)"
        lines.append(faults)
        lines += [f"    {f}" for f in (results.get("fault_log") or [])[-3:]]
    if results.get("attempts"):
        aside = results["attempts"]
        lines.append(f"  attempt {results.get('attempt')} (init seed {results.get('init_seed')}); "
                     f"{len(aside)} set aside in attempts/: " + ", ".join(
                         f"{a['ended']} ({a['monitor']} {_fmt(a['best'])})" for a in aside))
    if results.get("error"):
        lines.append(f"  error: {results['error']}")
    run_dir = results.get("run_dir")
    if run_dir:
        lines.append(f"  run dir {_relative(run_dir)} (results.json)")
    return lines


def _relative(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def point_line(name: str, results: dict) -> str:
    """One line for one run of a sweep: its status and test metric."""
    metric = next(((label, results[key]) for key, label in METRICS if results.get(key) is not None), None)
    return f"  {name}: {results.get('status', 'no results.json')}" + (f", {metric[0]} {_fmt(metric[1])}" if metric else "")


class MultirunSummary(Callback):
    """At the end of ``python train.py --multirun …``: one line per point (its status and test
    metric) and the sweep's ``summary.txt`` holding them."""

    def on_multirun_end(self, config, **kwargs) -> None:
        import json
        root = Path(config.hydra.sweep.dir)
        lines = [f"fprnn: sweep {root}"]
        for res in sorted(root.glob("*/results.json"), key=lambda p: p.parent.name):
            lines.append(point_line(res.parent.name, json.loads(res.read_text())))
        (root / "summary.txt").write_text("\n".join(lines) + "\n")
        lines.append(f"  summary: {root / 'summary.txt'}")
        print("\n".join(lines), flush=True)
