"""Nothing lost on a kill: ``last.ckpt`` every few steps, each file written whole or not at all;
``best.ckpt``, the network with the best validation metric, when validation is held out.

A SIGKILL (an out-of-memory kill, a preempted job, a lost node) cannot be handled, so the only
defence is to have saved recently: [`RunCheckpoint`][fprnn.training.checkpoint.RunCheckpoint] writes ``last.ckpt`` every
``every_n_steps`` optimizer steps, at each epoch end, and on Ctrl-C, SIGTERM or an error.
Every file of a run (checkpoints through [`AtomicCheckpointIO`][fprnn.training.checkpoint.AtomicCheckpointIO], ``results.json`` and
``weights.pt`` through [`atomic_write`][fprnn.training.checkpoint.atomic_write]) goes to a temporary file in the same folder that is
then renamed over the old one: a kill during a write leaves the previous file whole. A resumed
run keeps its CSV history ([`ResumableCSVLogger`][fprnn.training.checkpoint.ResumableCSVLogger]).
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger

from fprnn.core.checks import count
from fprnn.models.saved import network_state, read_weights, state_mismatch


#: Where each module of the flat layout (fprnn 0.1: every module at the package root) lives now.
#: Run directories written then name their classes ``fprnn.<module>.<Class>``.
MOVED = {
    **{m: f"core.{m}" for m in ("activations", "constraints", "dynamics", "implicit", "operators",
                                 "reference", "rules", "solvers")},
    **{m: f"models.{m}" for m in ("conv", "ctrnn", "encoders", "maze_net")},
    "model": "models.dense", "nn": "models.layer",
    **{m: f"data.{m}" for m in ("mazes", "ssn", "tasks", "vision")}, "data": "data.datamodules",
    **{m: f"training.{m}" for m in ("callbacks", "checkpoint", "console", "ddp", "module", "run",
                                     "update")},
    "trial_module": "training.objectives",     # its losses and metrics; TrialModule is FixedPointModule
    **{m: f"analysis.{m}" for m in ("figures", "landscape", "trial_figures")}, "analysis": "analysis.fixed_points",
    **{m: f"tools.{m}" for m in ("bench", "sweep")},
}


def upgrade_targets(node) -> None:
    """Rename, in place, every ``_target_: fprnn.<module>.<Class>`` of the flat layout to the
    module's place now (`MOVED`), so that a run directory written before the move loads."""
    if isinstance(node, DictConfig):
        target = node.get("_target_")
        parts = target.split(".") if isinstance(target, str) else []
        if len(parts) == 3 and parts[0] == "fprnn" and parts[1] in MOVED:
            node._target_ = f"fprnn.{MOVED[parts[1]]}.{parts[2]}"
        children = [node._get_node(k) for k in node.keys()]
    elif isinstance(node, ListConfig):
        children = [node._get_node(i) for i in range(len(node))]
    else:
        return
    for child in children:
        upgrade_targets(child)


def saved_config(run_dir) -> DictConfig:
    """A finished run's config: Hydra's copy (``.hydra/config.yaml``), or the one every logger got
    (``csv/hparams.yaml``, also written by runs started from Python); targets of the flat layout
    are renamed ([`upgrade_targets`][fprnn.training.checkpoint.upgrade_targets])."""
    run_dir = Path(run_dir)
    for f in (run_dir / ".hydra" / "config.yaml", run_dir / "csv" / "hparams.yaml"):
        if f.exists():
            cfg = OmegaConf.load(f)
            upgrade_targets(cfg)
            return cfg
    raise FileNotFoundError(f"{run_dir}: no .hydra/config.yaml or csv/hparams.yaml, the run's config")


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, flush it to disk, then rename it
    to ``path`` (a rename within a folder is atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on local disks. (Lightning's own goes through an
    fsspec transaction whose temporary file lies in the system's temp folder: on another file
    system the final move is a copy, which a kill can cut short.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        buf = io.BytesIO()                 # serialise first: the file is open only to copy bytes
        torch.save(checkpoint, buf)
        atomic_write(path, lambda fh: self._write(fh, buf.getbuffer()))

    def _write(self, fh, data) -> None:
        fh.write(data)


class RunCheckpoint(pl.Callback):
    """``<dirpath>/last.ckpt`` every ``every_n_steps`` optimizer steps (0: only at epoch ends),
    at each epoch end, and — on Ctrl-C, SIGTERM or an error — at the last finished step.

    The periodic save is taken at the start of the batch after the k-th step, where the
    counters of the step before are complete: the same state as the interrupt's save, from which
    ``resume=true`` continues exactly (same batches, same W). Unlike Lightning's
    OnExceptionCheckpoint, this callback never makes a fresh ``fit`` resume on its own."""

    def __init__(self, dirpath: str | Path, every_n_steps: int = 50):
        count("ckpt.every_n_steps", every_n_steps)
        self.path = Path(dirpath) / "last.ckpt"
        self.every = every_n_steps
        self.saved_at: int | None = None

    def save(self, trainer: pl.Trainer) -> None:
        for lg in trainer.loggers:      # the logs up to this point survive a kill with the checkpoint
            lg.save()
        trainer.save_checkpoint(self.path, weights_only=False)   # the whole state: a run resumes from it
        self.saved_at = trainer.global_step

    # Lightning logs at the count of batches done (epoch_loop._batches_that_stepped), and on a
    # restart adds one to the saved count, assuming the save was made in on_train_batch_end. Ours
    # are made between batches, where the count is already complete, so a resumed run would log
    # every later row one step late. The count is saved as it was and put back before the first
    # batch of the resumed run.
    log_step: int | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["fprnn_log_step"] = trainer.fit_loop.epoch_loop._batches_that_stepped

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        self.log_step = checkpoint.get("fprnn_log_step")

    def on_train_start(self, trainer, pl_module):
        self.saved_at = trainer.global_step    # a resumed run starts from a saved step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.log_step is not None:
            trainer.fit_loop.epoch_loop._batches_that_stepped = self.log_step
            self.log_step = None
        step = trainer.global_step
        if self.every and step % self.every == 0 and step != self.saved_at:
            self.save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self.save(trainer)

    def on_exception(self, trainer, pl_module, exception):
        self.save(trainer)


def best_callbacks(dirpath: str | Path, monitor: str, mode: str, patience: int | None) -> list[pl.Callback]:
    """Lightning's ModelCheckpoint keeping ``<dirpath>/best.ckpt`` (written through the trainer's
    [`AtomicCheckpointIO`][fprnn.training.checkpoint.AtomicCheckpointIO], so a kill leaves the previous best whole), and with ``patience``
    Lightning's EarlyStopping on the same metric."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"best.patience must be a positive number of validations or null, got {patience!r}")
    out: list[pl.Callback] = [ModelCheckpoint(dirpath=str(dirpath), filename="best", monitor=monitor, mode=mode,
                                              save_top_k=1, auto_insert_metric_name=False,
                                              enable_version_counter=False)]
    if patience is not None:
        out.append(EarlyStopping(monitor=monitor, mode=mode, patience=patience))
    return out


def checkpoint_weights(path: str | Path) -> tuple[dict, dict]:
    """The network's state dict in a training checkpoint (keys without the module's ``model.``),
    and the checkpoint's ``epoch`` and ``global_step``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return network_state(ckpt), {"epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step")}


def load_init_weights(model, path) -> None:
    """``init_weights``: fill the network the config built with a trained network's weights — a
    run directory's ``weights.pt`` or a checkpoint file — to go on training it, with another rule
    say (the optimizer, step count and data start afresh; ``resume`` continues a run instead)."""
    p = Path(path)
    source = p / "weights.pt" if p.is_dir() else p
    if not source.is_file():
        raise FileNotFoundError(f"init_weights={path}: " + ("no weights.pt in that run directory" if p.is_dir()
                                                           else "no such run directory or file"))
    try:
        weights = read_weights(source)
    except Exception as e:
        raise ValueError(f"init_weights={path}: {source.name} cannot be read ({type(e).__name__}: "
                         f"{str(e)[:120]})") from None
    wrong = state_mismatch(model.state_dict(), weights)
    if wrong:
        raise ValueError(f"init_weights={path}: {wrong} (the network built from this config)")
    model.load_state_dict(weights)


def check_checkpoint(path, model) -> int:
    """The checkpoint must exist, be readable and hold a network of this model's shape; returns
    the step it was saved at."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ckpt_path={path}: no such checkpoint file")
    try:
        weights, where = checkpoint_weights(p)
    except Exception as e:
        raise ValueError(f"ckpt_path={path} cannot be read ({type(e).__name__}: {str(e)[:120]}); it is "
                         f"damaged or not a checkpoint") from None
    if "layers.0.W" not in weights:
        raise ValueError(f"ckpt_path={path} is not an fprnn checkpoint (no model.layers.0.W in it)")
    wrong = state_mismatch(model.state_dict(), weights)
    if wrong:
        raise ValueError(f"ckpt_path={path} {wrong}")
    return int(where["global_step"] or 0)


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a resumed run keeps the rows logged before its cut.

    Lightning's deletes ``metrics.csv`` when its folder is not empty, so a run resumed in its
    own directory would lose its history up to the checkpoint. [`fprnn.training.run.train`][fprnn.training.run.train] calls
    `resume_at` with the checkpoint's step before anything is logged: rows of earlier steps
    are kept (later ones were logged after the checkpoint and will be logged again)."""

    _kept: tuple[list[str], list[dict]] | None = None

    def resume_at(self, step: int) -> None:
        path = Path(self.log_dir) / "metrics.csv"
        if not path.is_file():
            return
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            rows = [r for r in reader if r.get("step") not in (None, "") and float(r["step"]) < step]
            self._kept = (list(reader.fieldnames or []), rows)

    @property
    def experiment(self):
        fresh = self._experiment is None
        exp = CSVLogger.experiment.fget(self)         # creating the writer deletes metrics.csv
        if fresh and self._kept is not None and hasattr(exp, "metrics_file_path"):
            keys, rows = self._kept
            with open(exp.metrics_file_path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=keys)
                writer.writeheader()
                writer.writerows(rows)
            exp.metrics_keys = list(keys)              # later rows are appended under this header
            self._kept = None
        return exp
