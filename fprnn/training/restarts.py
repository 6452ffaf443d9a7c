"""Restarts: an attempt that has not learned by a given epoch makes way for a fresh initialisation.

Where learning comes as a jump that some initialisations make and others never do — the mazes
(docs/results.md, "Mazes"): of nine seeds, four jumped to a network that settles and
extrapolates within 1,750 steps, the others never did in 4,000 — a run can tell early, on its
validation split, whether its attempt has made the jump. ``restart.attempts`` > 1 gives a run that
many initialisations at most: an attempt whose best ``restart.monitor`` has not reached
``restart.threshold`` after ``restart.by_epoch`` epochs stops there, its outputs are set aside in
``<run dir>/attempts/<k>/`` (its CSV log, checkpoints and W&B run, and ``attempt.json``: its seed,
best value and epochs), and the next attempt starts from rest with another initialisation. The
last attempt always runs to the end. The data (its training stream, validation and test splits)
is the same in every attempt; the initialisation's seed is [`attempt_seed`][fprnn.training.restarts.attempt_seed].
The test split is read once, by the attempt that ran to the end.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl

from fprnn.core.checks import positive_int

log = logging.getLogger(__name__)

ATTEMPTS_DIR = "attempts"
#: what an attempt leaves in the run directory besides the run's own files (set aside when it gives way)
ATTEMPT_OUTPUTS = ("csv", "checkpoints", "wandb")


def attempt_seed(seed: int, attempt: int) -> int:
    """The initialisation's seed of attempt ``attempt`` (from 0) of a run with ``seed``: the seed
    itself for the first, so a run with one attempt is the run without restarts; a draw seeded by
    (seed, attempt) for the others, so that no two attempts of nearby seeds share an initialisation."""
    if attempt == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(attempt)]).generate_state(1)[0] % 2**31)


@dataclass(frozen=True)
class Restart:
    """``restart.*`` of the config, checked: see the module docstring."""
    attempts: int = 1
    monitor: str | None = None
    threshold: float | None = None
    by_epoch: int | None = None
    mode: str = "max"

    def __post_init__(self):
        positive_int("restart.attempts", self.attempts)
        if self.attempts == 1:
            return
        if not self.monitor:
            raise ValueError(f"restart.attempts={self.attempts} needs restart.monitor: the validation metric "
                             f"that says an attempt has learned (e.g. val/solved)")
        if self.threshold is None or not math.isfinite(float(self.threshold)):
            raise ValueError(f"restart.threshold must be a finite number with restart.attempts={self.attempts}, "
                             f"got {self.threshold!r}")
        positive_int("restart.by_epoch", self.by_epoch)
        if self.mode not in ("max", "min"):
            raise ValueError(f"restart.mode must be 'max' or 'min', got {self.mode!r}")

    def callback(self, attempt: int, max_epochs: int | None, held_out_validation: bool) -> "GiveWay | None":
        """The callback that stops attempt ``attempt`` if it has not learned; none for the last, and
        none (with a warning: a preset's restarts under a user's shorter training or no validation)
        where no attempt could give way: without a held-out validation split, or when ``by_epoch`` is
        not before the end of training."""
        if self.attempts == 1:
            return None
        if not held_out_validation:
            log.warning(f"restart.attempts={self.attempts} judges attempts on a held-out validation split; this "
                        f"data has none, so the run makes one attempt")
            return None
        if max_epochs is not None and 0 < max_epochs <= self.by_epoch:
            log.warning(f"restart.by_epoch={self.by_epoch} is not before the end of training (trainer.max_epochs="
                        f"{max_epochs}), so the run makes one attempt")
            return None
        if attempt >= self.attempts - 1:
            return None
        return GiveWay(self.monitor, float(self.threshold), self.by_epoch, self.mode)


class GiveWay(pl.Callback):
    """Stops training after ``by_epoch`` epochs unless the best ``monitor`` seen in validation so far
    has reached ``threshold`` (at least it for ``mode`` max, at most for min); ``gave_way`` then says so."""

    def __init__(self, monitor: str, threshold: float, by_epoch: int, mode: str = "max"):
        self.monitor, self.threshold, self.by_epoch, self.mode = monitor, threshold, by_epoch, mode
        self.best: float | None = None
        self.gave_way = False

    def state_dict(self) -> dict:
        """In every checkpoint: a resumed attempt is judged on its validations before the cut too."""
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state["best"]

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.mode == "max" else a < b)

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ValueError(f"restart.monitor={self.monitor!r} is not logged in validation; logged: "
                             f"{sorted(k for k in trainer.callback_metrics if k.startswith('val/'))}")
        value = float(value)
        if math.isfinite(value) and self._better(value, self.best):
            self.best = value
        learned = self.best is not None and (self.best >= self.threshold if self.mode == "max"
                                             else self.best <= self.threshold)
        # ≥: the first validation from by_epoch on decides, also where validation skips epochs
        if trainer.current_epoch + 1 >= self.by_epoch and not learned:
            self.gave_way = True
            trainer.should_stop = True


def attempts_set_aside(run_dir: Path) -> list[dict]:
    """The records of the attempts a run has set aside so far, in order (a resumed run goes on
    with the next)."""
    root = Path(run_dir) / ATTEMPTS_DIR
    records = []
    for k in range(len(list(root.glob("*/attempt.json"))) if root.is_dir() else 0):
        path = root / str(k) / "attempt.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the attempts of {run_dir} are not numbered 0…n−1")
        records.append(json.loads(path.read_text()))
    return records


def set_aside(run_dir: Path, record: dict) -> Path:
    """Move an attempt's outputs into ``<run dir>/attempts/<k>/`` with its record, ``attempt.json``."""
    where = Path(run_dir) / ATTEMPTS_DIR / str(record["attempt"])
    where.mkdir(parents=True, exist_ok=False)
    (where / "attempt.json").write_text(json.dumps(record, indent=2))
    for name in ATTEMPT_OUTPUTS:
        if (Path(run_dir) / name).exists():
            shutil.move(str(Path(run_dir) / name), str(where / name))
    return where
