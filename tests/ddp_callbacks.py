"""Callbacks that break things on purpose, for the multi-device and reliability tests."""
import os
import signal

import pytorch_lightning as pl
import torch


class PerturbRank(pl.Callback):
    """Adds 1e-3 to W on one rank after a given step: the rank-agreement check must fire."""

    def __init__(self, rank: int = 1, step: int = 3):
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.model.W[0, 0] += 1e-3


class SignalAt(pl.Callback):
    """Sends this process a signal (SIGTERM or SIGINT) right after a given step."""

    def __init__(self, step: int = 5, sig: str = "SIGTERM"):
        self.step, self.sig = step, getattr(signal, sig)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.sig)


class KillAt(pl.Callback):
    """SIGKILL — which no handler can catch — right after a given step or, with
    ``during_write``, halfway through writing the first checkpoint at or after it."""

    def __init__(self, step: int = 5, during_write: bool = False):
        self.step, self.during_write = step, during_write

    def setup(self, trainer, pl_module, stage):
        if not self.during_write:
            return
        io = trainer.strategy.checkpoint_io
        write = io._write

        def cut(fh, data):
            if trainer.global_step >= self.step:
                fh.write(bytes(data[: len(data) // 2]))
                fh.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            write(fh, data)

        io._write = cut

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.during_write and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class NaNOnRank(pl.Callback):
    """Puts a NaN into one rank's batch once, at the given step (a skipped step leaves the step
    count where it was, so the next batch must stay clean)."""

    def __init__(self, rank: int = 1, step: int = 2):
        self.rank, self.step, self.done = rank, step, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step and not self.done:
            batch[0][0, 0] = float("nan")
            self.done = True


class BackwardFaultOnRank(pl.Callback):
    """Once, at the given step, one rank's w2 is given an η far outside its domain for that step's
    backward: the fault arises inside backward, on that rank only."""

    def __init__(self, rank: int = 1, step: int = 2):
        self.rank, self.step, self.eta, self.done = rank, step, None, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and trainer.global_step == self.step and not self.done:
            spec = pl_module.model.layers[0].backward_rule
            self.eta, spec.eta, self.done = spec.eta, 1e9, True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.eta is not None:
            pl_module.model.layers[0].backward_rule.eta, self.eta = self.eta, None
