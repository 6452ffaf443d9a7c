"""The trial format of tasks in time, whatever makes the trials: a `Trial` (inputs, targets and
loss weights per step, where its static start ends, when it answers), the one batch format
([`collate`][fprnn.data.trials.collate]), the static part's detector ([`static_steps`][fprnn.data.trials.static_steps]) and
[`TrialData`][fprnn.data.trials.TrialData], the data module every source subclasses
([`fprnn.data.neurogym_tasks`][fprnn.data.neurogym_tasks], [`fprnn.data.trial_files`][fprnn.data.trial_files]).

Targets are either **actions** (one integer per step, cross-entropy) or **continuous** (a vector per
step, masked mean squared error); ``loss="auto"`` follows them.

Trial k of a split is drawn by a generator seeded with (seed, split, k) alone, so the validation and
test trials are the same in every run with one seed, and a resumed run draws the training trials it
had not seen.

The static part of a trial (``static``): the leading periods over which the input is constant —
fixation, a context cue — found from the data (``auto``: periods are taken in order while the input
stays equal to its first value; a trial without periods, from a file, holds as long as its input
does), or named (the static part ends with that period, whose input must then be constant), or
``none``. A network starting at the fixed point of that constant input
([`fprnn.models.ctrnn`][fprnn.models.ctrnn]) replaces simulating it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fprnn.core.checks import positive_int
from fprnn.data.datamodules import ResumableData, dist_info, per_device

Tensor = torch.Tensor
SPLITS = {"train": 0, "val": 1, "test": 2}
LOSSES = ("auto", "cross_entropy", "mse")


@dataclass
class Trial:
    ob: np.ndarray          # (T, n_in) inputs
    gt: np.ndarray          # (T,) target action per step, or (T, n_out) continuous targets
    static: int             # leading steps of constant input
    answer: int             # the step at which the answer is read (last step of the decision period)
    decision: tuple[int, int]   # [start, end) of the decision period
    info: dict              # the trial's scalars (NeuroGym's trial dict: ground truth, coherence, context…)
    periods: list           # (name, start, end) of every period, in time order
    weight: np.ndarray | None = None    # (T,) the loss weight of each step, when the trials give it (a mask)


def constant_prefix(ob: np.ndarray) -> int:
    """How many leading steps of ``ob`` (T, n_in) equal its first: the longest a network can hold one
    static input's fixed point."""
    same = (ob == ob[0]).all(1)
    return len(ob) if bool(same.all()) else int(np.argmax(~same))


def static_steps(ob: np.ndarray, periods: list[tuple[str, int, int]], static: str) -> int:
    """How many leading steps of ``ob`` are the trial's static part (see the module docstring);
    ``periods``: (name, start, end) in time order."""
    if static == "none":
        return 0
    held = constant_prefix(ob)
    if static == "auto":
        k = 0
        for _, start, end in periods:
            if end <= start:
                continue
            if start != k or end > held:
                break
            k = end
        return k
    names = [p[0] for p in periods]
    if static not in names:
        raise ValueError(f"static={static!r} is not a period of this task; its periods are {names}, "
                         f"or use 'auto' or 'none'")
    k = dict((p[0], p[2]) for p in periods)[static]
    if k > held:
        raise ValueError(f"static={static!r}: the input is not constant up to the end of that period, "
                         f"so the trial cannot start at one fixed point; use 'auto' or an earlier period")
    return k


class TrialSet(Dataset):
    """The trials of a split: n drawn once and kept (validation, test), or drawn on demand by index
    (training: n trials an epoch, epoch e asks for trials e·n … e·n + n − 1, [`EpochTrials`][fprnn.data.trials.EpochTrials]).
    ``draw(split, k)`` makes trial k of the split."""

    def __init__(self, draw: Callable[[str, int], Trial], n: int, split: str, keep: bool):
        self.draw, self.n, self.split = draw, n, split
        self.kept = [draw(split, k) for k in range(n)] if keep else None

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> tuple[int, Trial]:
        return k, self.kept[k] if self.kept is not None else self.draw(self.split, k)


class EpochTrials(Sampler[int]):
    """Training trial indices epoch·n … epoch·n + n − 1 (fresh trials every epoch), sharded so that
    global batch t is the one-device batch t split over ``world`` devices (rank r takes every
    world-th), resuming ``skip`` = (epoch, trials already consumed by this device)."""

    def __init__(self, n: int, batch: int, rank: int = 0, world: int = 1, skip=None):
        self.n, self.batch, self.rank, self.world, self.skip, self.epoch = n, batch, rank, world, skip, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        mine = list(range(self.epoch * self.n, (self.epoch + 1) * self.n))[self.rank::self.world]
        if self.skip is not None and self.skip[0] == self.epoch:
            mine = mine[self.skip[1]:]
        return iter(mine)

    def __len__(self) -> int:
        return self.n // self.world


def collate(items: list[tuple[int, Trial]], decision_weight: float) -> dict[str, Tensor]:
    """Trials padded to the longest: ``ob`` (B, T, n_in), ``gt`` (B, T) actions or (B, T, n_out)
    continuous targets, ``mask`` (B, T) (True on the trial's own steps), ``weight`` (B, T) (the
    loss weight of each step: the trial's own when it gives one, else 1 and ``decision_weight`` in
    the decision period; padding 0), ``static`` (B,), ``answer`` (B,) and ``index`` (B,)."""
    B, T = len(items), max(len(t.ob) for _, t in items)
    first = items[0][1].gt
    ob = torch.zeros(B, T, items[0][1].ob.shape[1])
    gt = torch.zeros(B, T, dtype=torch.long) if first.ndim == 1 else torch.zeros(B, T, first.shape[1])
    mask = torch.zeros(B, T, dtype=torch.bool)
    weight = torch.zeros(B, T)
    for i, (_, t) in enumerate(items):
        n = len(t.ob)
        ob[i, :n], gt[i, :n], mask[i, :n] = torch.from_numpy(t.ob), torch.from_numpy(t.gt), True
        if t.weight is not None:
            weight[i, :n] = torch.from_numpy(t.weight)
        else:
            weight[i, :n] = 1.0
            weight[i, t.decision[0]:t.decision[1]] = decision_weight
    return {"ob": ob, "gt": gt, "mask": mask, "weight": weight,
            "static": torch.tensor([t.static for _, t in items]),
            "answer": torch.tensor([t.answer for _, t in items]),
            "index": torch.tensor([k for k, _ in items])}


class TrialData(ResumableData):
    """Training, validation and test trials of a task in time, whatever makes them: a subclass
    gives ``draw(split, k)``, ``n_in``, ``n_out``, ``targets`` ("actions" | "continuous"), the
    counts and ``name``. ``loss``: ``auto`` (cross-entropy for actions, MSE for continuous
    targets), ``cross_entropy`` or ``mse``. ``batch_size`` is the global batch (split equally over
    devices)."""

    decision_weight = 1.0
    condition_keys: list[str] = []

    objective = "trials"

    def __init__(self, batch_size: int, eval_batch_size: int, seed: int, loss: str):
        super().__init__()
        for name, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            positive_int(name, v)
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSSES)}")
        self.batch_size, self.eval_batch_size, self.seed, self._loss = batch_size, eval_batch_size, seed, loss
        # every step is a target of the network in time, which is what ``task`` tells the rest of fprnn
        self.task = "classification"
        self.val_set = self.test_set = None
        self.val_on_test = False

    def _check_loss(self) -> None:
        if self._loss == "cross_entropy" and self.targets == "continuous":
            raise ValueError(f"loss=cross_entropy needs action targets; {self.name!r} has continuous targets "
                             f"({self.n_out} per step): use loss=mse or auto")
        if self._loss == "mse" and self.targets == "actions":
            raise ValueError(f"loss=mse needs continuous targets; {self.name!r} has actions (integers 0…"
                             f"{self.n_out - 1}): use loss=cross_entropy or auto")

    @property
    def loss(self) -> str:
        """The loss on the outputs: ``cross_entropy`` (actions) or ``mse`` (continuous targets)."""
        return "mse" if self.targets == "continuous" else "cross_entropy"

    @property
    def validation(self) -> str:
        return f"{self.val_trials} held-out trials (seed {self.seed})"

    @property
    def val_size(self) -> int:
        return self.val_trials

    def draw(self, split: str, k: int) -> Trial:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            self.val_set = TrialSet(self.draw, self.val_trials, "val", keep=True)
            self.test_set = TrialSet(self.draw, self.test_trials, "test", keep=True)

    def _collate(self, items):
        return collate(items, self.decision_weight)

    def train_dataloader(self):
        rank, world = dist_info(self)
        per = per_device(self.batch_size, world)
        n = (self.train_trials // self.batch_size) * self.batch_size   # whole global batches only
        train = TrialSet(self.draw, n, "train", keep=False)
        sampler = EpochTrials(n, self.batch_size, rank, world, self._skip(per))
        return DataLoader(train, batch_size=per, sampler=sampler, collate_fn=self._collate)

    def _eval_loader(self, ds):
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, collate_fn=self._collate)

    def val_dataloader(self):
        return self._eval_loader(self.val_set)

    def test_dataloader(self):
        return self._eval_loader(self.test_set)

    def probe_batch(self, k: int = 16) -> dict[str, Tensor]:
        """The first k validation trials, collated."""
        self.setup()
        return self._collate([self.val_set[i] for i in range(min(k, len(self.val_set)))])

    def trial_info(self, split: str, index: Tensor) -> list[dict]:
        ds = self.val_set if split == "val" else self.test_set
        return [ds.kept[int(k)].info for k in index]

    def _static_note(self, first: Trial, static) -> None:
        #: a note for the log when trials have no static part to start from
        self.note = None if first.static else (
            f"task {self.name!r}: the input is not constant over its first steps (static={static!r}), so its "
            f"trials start from rest (r = 0) whatever model.start says")
