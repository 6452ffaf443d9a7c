"""Cognitive tasks in time from NeuroGym (``neurogym`` on PyPI): trials drawn one by one from a
task's own generator, padded to the batch's longest, with what a network in time needs to know of
each — where its static start ends, which steps count and how much, and when it answers.

A trial is NeuroGym's ``new_trial()``: inputs ``ob`` (T, n_in), the target action ``gt`` (T,) and
its periods (fixation, stimulus, delay, decision…). Trial k of a split is drawn by a generator
seeded with (seed, split, k) alone, so the validation and test trials are the same in every run
with one seed, and a resumed run draws the training trials it had not seen.

The static part of a trial (``static``): the leading periods over which the input is constant —
fixation, a context cue — found from the data (``auto``: periods are taken in order while the input
stays equal to its first value), or named (the static part ends with that period, whose input must
then be constant), or ``none``. A network starting at the fixed point of that constant input
(:mod:`fprnn.ctrnn`) replaces simulating it.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data import ResumableData, _dist, _per_device, _positive_int

Tensor = torch.Tensor
SPLITS = {"train": 0, "val": 1, "test": 2}
CONDITIONS = ("context", "coh")


def task_names() -> list[str]:
    from neurogym.envs.registration import all_envs
    return all_envs()


def make_env(task: str, dt: float, kwargs: dict | None):
    """The NeuroGym TrialEnv for ``task`` (an id such as ``ContextDecisionMaking-v0``) with time
    step ``dt`` (ms) and the env's own options."""
    import neurogym
    names = task_names()
    if task not in names:
        raise ValueError(f"unknown NeuroGym task {task!r}; choose one of {', '.join(names)}")
    kwargs = dict(kwargs or {})
    if "dt" in kwargs:
        raise ValueError(f"give the time step as data.dt (the network's Euler step uses it too), "
                         f"not in data.kwargs (got dt={kwargs['dt']!r})")
    with warnings.catch_warnings():
        # Gymnasium asks every env for render_modes, which NeuroGym's trial generators do not have
        warnings.filterwarnings("ignore", message=".*render_modes.*", module="gymnasium")
        try:
            return neurogym.make(task, dt=dt, **kwargs).unwrapped
        except TypeError as e:
            raise ValueError(f"NeuroGym task {task!r} rejects data.kwargs={kwargs}: {e}") from None


def merged(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``, nested dicts key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


@dataclass
class Trial:
    ob: np.ndarray          # (T, n_in) inputs
    gt: np.ndarray          # (T,) target action per step
    static: int             # leading steps of constant input
    answer: int             # the step at which the answer is read (last step of the decision period)
    decision: tuple[int, int]   # [start, end) of the decision period
    info: dict              # NeuroGym's trial dict (ground truth, coherence, context…), scalars
    periods: list           # (name, start, end) of every period, in time order


def static_steps(ob: np.ndarray, periods: list[tuple[str, int, int]], static: str) -> int:
    """How many leading steps of ``ob`` are the trial's static part (see the module docstring);
    ``periods``: (name, start, end) in time order."""
    if static == "none":
        return 0
    if static == "auto":
        k = 0
        for _, start, end in periods:
            if end <= start:
                continue
            if start != k or not (ob[start:end] == ob[0]).all():
                break
            k = end
        return k
    names = [p[0] for p in periods]
    if static not in names:
        raise ValueError(f"static={static!r} is not a period of this task; its periods are {names}, "
                         f"or use 'auto' or 'none'")
    k = dict((p[0], p[2]) for p in periods)[static]
    if not (ob[:k] == ob[0]).all():
        raise ValueError(f"static={static!r}: the input is not constant up to the end of that period, "
                         f"so the trial cannot start at one fixed point; use 'auto' or an earlier period")
    return k


def draw_trial(env, seed: int, split: str, k: int, static: str, decision_period: str) -> Trial:
    """Trial k of ``split``, from a generator seeded by (seed, split, k) alone."""
    env.seed(int(np.random.SeedSequence([int(seed), SPLITS[split], int(k)]).generate_state(1)[0]))
    info = env.new_trial()
    ob, gt = np.asarray(env.ob, dtype=np.float32), np.asarray(env.gt)
    if gt.ndim != 1:
        raise ValueError(f"task {type(env).__name__} has vector targets (shape {gt.shape}); fprnn's trials "
                         f"are classification tasks with one target action per step")
    periods = sorted(((p, env.start_ind[p], env.end_ind[p]) for p in env.start_ind), key=lambda p: (p[1], p[2]))
    T = len(ob)
    if decision_period in env.start_ind and env.end_ind[decision_period] > env.start_ind[decision_period]:
        decision = (env.start_ind[decision_period], min(env.end_ind[decision_period], T))
    else:               # NeuroGym's own convention: the answer is the trial's last step
        decision = (T - 1, T)
    scalars = {key: v.item() if isinstance(v, np.generic) else v for key, v in info.items()
               if isinstance(v, (int, float, np.generic)) and not isinstance(v, bool)}
    if {"context", "coh_1", "coh_2"} <= scalars.keys():    # ContextDecisionMaking: the coherence that counts
        scalars["coh"] = scalars[f"coh_{int(scalars['context']) + 1}"]
    return Trial(ob, gt.astype(np.int64), static_steps(ob, periods, static), decision[1] - 1, decision, scalars,
                 periods)


class TrialSet(Dataset):
    """The trials of a split: n drawn once and kept (validation, test), or drawn on demand by index
    (training: n trials an epoch, epoch e asks for trials e·n … e·n + n − 1, :class:`EpochTrials`)."""

    def __init__(self, env, n: int, seed: int, split: str, static: str, decision_period: str, keep: bool):
        self.env, self.n, self.seed, self.split = env, n, seed, split
        self.static, self.decision_period = static, decision_period
        self.kept = [self._draw(k) for k in range(n)] if keep else None

    def _draw(self, k: int) -> Trial:
        return draw_trial(self.env, self.seed, self.split, k, self.static, self.decision_period)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> tuple[int, Trial]:
        return k, self.kept[k] if self.kept is not None else self._draw(k)


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
    """Trials padded to the longest: ``ob`` (B, T, n_in), ``gt`` (B, T), ``mask`` (B, T) (True on
    the trial's own steps), ``weight`` (B, T) (the loss weight of each step: 1, the decision period
    ``decision_weight``, padding 0), ``static`` (B,), ``answer`` (B,) and ``index`` (B,)."""
    B, T = len(items), max(len(t.ob) for _, t in items)
    ob = torch.zeros(B, T, items[0][1].ob.shape[1])
    gt = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    weight = torch.zeros(B, T)
    for i, (_, t) in enumerate(items):
        n = len(t.ob)
        ob[i, :n], gt[i, :n], mask[i, :n] = torch.from_numpy(t.ob), torch.from_numpy(t.gt), True
        weight[i, :n] = 1.0
        weight[i, t.decision[0]:t.decision[1]] = decision_weight
    return {"ob": ob, "gt": gt, "mask": mask, "weight": weight,
            "static": torch.tensor([t.static for _, t in items]),
            "answer": torch.tensor([t.answer for _, t in items]),
            "index": torch.tensor([k for k, _ in items])}


class NeuroGymDataModule(ResumableData):
    """A NeuroGym task as training, validation and test trials (see the module docstring).

    ``task``: a NeuroGym id; ``kwargs``: the env's options (timing, dim_ring, use_expl_context…);
    ``dt``: the time step in ms (NeuroGym's and the network's). ``train_trials`` fresh trials make
    an epoch; ``val_trials`` and ``test_trials`` are drawn once. ``decision_weight``: the loss
    weight of the decision period's steps relative to the others (Yang et al. 2019 use 5);
    ``decision_period``: the period whose last step is the answer (tasks without one answer at
    their last step). ``batch_size`` is the global batch (split equally over devices).
    ``conditions``: the keys of NeuroGym's trial info that make a condition for the test
    performance per condition (default: context and coherence, those a task has; for
    ContextDecisionMaking ``coh`` is the coherence of the modality the context makes relevant).
    ``task_kwargs``: options per task id, used when that task is the one chosen (a preset's
    well-posed timings), with ``kwargs`` merged over them — so that ``kwargs={}`` with another
    ``task`` gives that task its own defaults."""

    def __init__(self, task: str = "ContextDecisionMaking-v0", kwargs: dict | None = None, dt: float = 20,
                 static: str = "auto", decision_weight: float = 5.0, decision_period: str = "decision",
                 batch_size: int = 64, eval_batch_size: int = 512, train_trials: int = 6400,
                 val_trials: int = 512, test_trials: int = 1024, seed: int = 0,
                 conditions: list[str] | None = None, task_kwargs: dict | None = None):
        super().__init__()
        for name, v in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                        ("train_trials", train_trials), ("val_trials", val_trials), ("test_trials", test_trials)):
            _positive_int(name, v)
        if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
            raise ValueError(f"dt must be a positive number of ms, got {dt!r}")
        if isinstance(decision_weight, bool) or not isinstance(decision_weight, (int, float)) \
                or not math.isfinite(decision_weight) or decision_weight < 0:
            raise ValueError(f"decision_weight must be a non-negative number, got {decision_weight!r}")
        if not isinstance(static, str):
            raise ValueError(f"static must be 'auto', 'none' or a period name, got {static!r}")
        # every step is a classification of the action, which is what ``task`` tells the rest of fprnn
        self.env_id, self.task = task, "classification"
        self.kwargs, self.dt, self.static = merged(dict(task_kwargs or {}).get(task, {}), kwargs or {}), dt, static
        self.decision_weight, self.decision_period = float(decision_weight), decision_period
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_trials, self.val_trials, self.test_trials, self.seed = train_trials, val_trials, test_trials, seed
        #: the trial-info keys whose values make a condition, for performance per condition
        self.condition_keys = list(conditions) if conditions is not None else list(CONDITIONS)
        self.env = make_env(task, dt, self.kwargs)
        self.n_in = int(self.env.observation_space.shape[0])
        self.n_out = int(self.env.action_space.n)
        self.name = task
        self.val_set = self.test_set = None
        self.val_on_test, self.val_size = False, val_trials
        first = draw_trial(self.env, seed, "train", 0, static, decision_period)
        #: a note for the log when trials have no static part to start from
        self.note = None if first.static else (
            f"task {task!r}: the input is not constant over its first period (static={static!r}), so its "
            f"trials start from rest (r = 0) whatever model.start says")

    @property
    def validation(self) -> str:
        return f"{self.val_trials} held-out trials (seed {self.seed})"

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            self.val_set = TrialSet(self.env, self.val_trials, self.seed, "val", self.static,
                                    self.decision_period, keep=True)
            self.test_set = TrialSet(self.env, self.test_trials, self.seed, "test", self.static,
                                     self.decision_period, keep=True)

    def _collate(self, items):
        return collate(items, self.decision_weight)

    def train_dataloader(self):
        rank, world = _dist(self)
        per = _per_device(self.batch_size, world)
        n = (self.train_trials // self.batch_size) * self.batch_size   # whole global batches only
        train = TrialSet(self.env, n, self.seed, "train", self.static, self.decision_period, keep=False)
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
