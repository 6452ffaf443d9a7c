"""Tasks in time: trials with inputs, targets and loss weights per step, and what a network in time
needs to know of each — where its static start ends, which steps count and how much, and when it
answers. Three sources, one trial format (`Trial`) and one batch format ([`collate`][fprnn.data.tasks.collate]):

- a NeuroGym task (``neurogym`` on PyPI) by its id, ``ContextDecisionMaking-v0``;
- a user's own NeuroGym ``TrialEnv`` subclass, ``task="my_tasks:MyTask"`` (imported from the
  working directory or ``PYTHONPATH``), seeded exactly as the registered ids;
- trials a user generated (PsychRNN's and nn4n's convention: inputs, targets and a mask per step),
  from a ``.npz`` file ([`TrialFileDataModule`][fprnn.data.tasks.TrialFileDataModule]).

Targets are either **actions** (one integer per step, cross-entropy) or **continuous** (a vector per
step, masked mean squared error): NeuroGym's ``Box`` action spaces, and tasks whose ground truth is
not an action index (the Reaching1D family stores the target angle). ``loss="auto"`` follows them.

Trial k of a split is drawn by a generator seeded with (seed, split, k) alone, so the validation and
test trials are the same in every run with one seed, and a resumed run draws the training trials it
had not seen.

The static part of a trial (``static``): the leading periods over which the input is constant —
fixation, a context cue — found from the data (``auto``: periods are taken in order while the input
stays equal to its first value), or named (the static part ends with that period, whose input must
then be constant), or ``none``. A network starting at the fixed point of that constant input
([`fprnn.models.ctrnn`][fprnn.models.ctrnn]) replaces simulating it.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fprnn.core.checks import number, positive_int
from fprnn.data.datamodules import ResumableData, dist_info, per_device

Tensor = torch.Tensor
SPLITS = {"train": 0, "val": 1, "test": 2}
CONDITIONS = ("context", "coh")
LOSSES = ("auto", "cross_entropy", "mse")


def task_names() -> list[str]:
    from neurogym.envs.registration import all_envs
    return all_envs()


def _env_class(task: str, names: list[str]):
    """The TrialEnv class behind ``task``: ``module:Class`` imported (the working directory first on
    the path, as Python does for a script), or a registered NeuroGym id's entry point."""
    if ":" in task:
        module, _, name = task.partition(":")
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise ValueError(f"task {task!r}: cannot import module {module!r} ({e}); put it in the working "
                             f"directory or on PYTHONPATH") from None
        except Exception as e:      # the user's module itself fails: say where, as one line
            raise ValueError(f"task {task!r}: importing module {module!r} failed: {type(e).__name__}: {e}") from None
        cls = getattr(found, name, None)
        if cls is None:
            raise ValueError(f"task {task!r}: module {module!r} has no {name!r}")
        from neurogym.core import TrialEnv
        if not (isinstance(cls, type) and issubclass(cls, TrialEnv)):
            raise ValueError(f"task {task!r} is not a NeuroGym TrialEnv subclass (got {cls!r}); a task of "
                             f"your own subclasses neurogym.core.TrialEnv and builds its trials in _new_trial")
        return cls
    if task not in names:
        raise ValueError(f"unknown NeuroGym task {task!r}; choose one of {', '.join(names)}, or give your own "
                         f"as module:Class")
    import gymnasium
    from gymnasium.envs.registration import load_env_creator
    return load_env_creator(gymnasium.spec(task).entry_point)


def make_env(task: str, dt: float, kwargs: dict | None):
    """The TrialEnv for ``task`` — a NeuroGym id such as ``ContextDecisionMaking-v0`` or a class of
    the user's, ``module:Class`` — with time step ``dt`` (ms) and the env's own options."""
    import neurogym
    kwargs = dict(kwargs or {})
    if "dt" in kwargs:
        raise ValueError(f"give the time step as data.dt (the network's Euler step uses it too), "
                         f"not in data.kwargs (got dt={kwargs['dt']!r})")
    cls = _env_class(task, [] if ":" in task else task_names())
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        params = {}
    required = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs]
    if required:
        raise ValueError(f"task {task!r} needs options {', '.join(required)}: give them in data.kwargs, "
                         f"e.g. data.kwargs={{{', '.join(f'{n}: …' for n in required)}}}")
    if params and "dt" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"task {task!r} takes no dt argument; a TrialEnv's __init__ takes dt (ms) and passes "
                         f"it to TrialEnv.__init__(dt=dt)")
    with warnings.catch_warnings():
        # Gymnasium asks every env for render_modes, which NeuroGym's trial generators do not have
        warnings.filterwarnings("ignore", message=".*render_modes.*", module="gymnasium")
        try:
            env = neurogym.make(task, dt=dt, **kwargs).unwrapped if ":" not in task else cls(dt=dt, **kwargs)
        except TypeError as e:
            raise ValueError(f"task {task!r} rejects data.kwargs={kwargs}: {e}") from None
    return env


def refusal(task: str, kwargs: dict | None = None, dt: float = 20) -> str | None:
    """Why ``task`` cannot be trained as it is configured (one line), or None if it can."""
    try:
        env = make_env(task, dt, kwargs)
        draw_trial(env, 0, "train", 0, "auto", "decision")
    except ValueError as e:
        return str(e)
    return None


def merged(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``, nested dicts key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


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


def target_kind(env, gt: np.ndarray) -> tuple[str, int]:
    """("actions", number of actions) or ("continuous", output channels) of a task, from its action
    space and a trial's ground truth: continuous when the space is a Box, the targets are vectors, or
    they are not indices of the Discrete space's actions (Reaching1D stores an angle)."""
    from gymnasium import spaces
    space = getattr(env, "action_space", None)
    if gt.ndim == 2:
        return "continuous", int(gt.shape[1])
    if isinstance(space, spaces.Discrete):
        whole = np.issubdtype(gt.dtype, np.integer) or bool((gt == np.round(gt)).all())
        if whole and gt.min() >= 0 and gt.max() < space.n:
            return "actions", int(space.n)
        return "continuous", 1
    if isinstance(space, spaces.Box) or np.issubdtype(gt.dtype, np.floating):
        return "continuous", 1
    raise ValueError(f"task {type(env).__name__}: its action_space {space!r} is neither Discrete (actions) nor "
                     f"Box (continuous targets)")


def no_trials(env) -> str | None:
    """Why ``env``'s last ``new_trial()`` gives nothing to train on, or None."""
    name = type(env).__name__
    if not getattr(env, "_ob_built", hasattr(env, "ob")):
        return (f"task {name} builds no inputs for its trials (no ob): it is a reinforcement-learning task that "
                f"is stepped, not a supervised one, and fprnn trains supervised tasks")
    if not getattr(env, "_gt_built", hasattr(env, "gt")):
        return (f"task {name} has no supervised target (no ground truth gt): it is a reinforcement-learning "
                f"task that learns from rewards, and fprnn trains supervised tasks")
    return None


def draw_trial(env, seed: int, split: str, k: int, static: str, decision_period: str,
               targets: tuple[str, int] | None = None) -> Trial:
    """Trial k of ``split``, from a generator seeded by (seed, split, k) alone. ``targets``: the
    task's (kind, size) from [`target_kind`][fprnn.data.tasks.target_kind] (None: this trial's own)."""
    env.seed(int(np.random.SeedSequence([int(seed), SPLITS[split], int(k)]).generate_state(1)[0]))
    try:
        info = env.new_trial()
    except Exception as e:
        raise ValueError(f"task {type(env).__name__}: new_trial() failed on trial {k} of {split} "
                         f"({type(e).__name__}: {e})") from None
    why = no_trials(env)
    if why is not None:
        raise ValueError(why)
    ob, gt = np.asarray(env.ob, dtype=np.float32), np.asarray(env.gt)
    if ob.ndim != 2 or gt.shape[:1] != ob.shape[:1] or gt.ndim > 2:
        raise ValueError(f"task {type(env).__name__}: ob {ob.shape} and gt {gt.shape} must be (T, n_in) and (T,) "
                         f"or (T, n_out) with the same T")
    periods = sorted(((p, env.start_ind[p], env.end_ind[p]) for p in env.start_ind), key=lambda p: (p[1], p[2]))
    T = len(ob)
    if decision_period in env.start_ind and env.end_ind[decision_period] > env.start_ind[decision_period]:
        decision = (env.start_ind[decision_period], min(env.end_ind[decision_period], T))
    else:               # NeuroGym's own convention: the answer is the trial's last step
        decision = (T - 1, T)
    scalars = {key: v.item() if isinstance(v, np.generic) else v for key, v in (info or {}).items()
               if isinstance(v, (int, float, np.generic)) and not isinstance(v, bool)}
    if {"context", "coh_1", "coh_2"} <= scalars.keys():    # ContextDecisionMaking: the coherence that counts
        scalars["coh"] = scalars[f"coh_{int(scalars['context']) + 1}"]
    kind, size = targets or target_kind(env, gt)
    if kind == "actions":
        if gt.ndim != 1 or gt.min() < 0 or gt.max() >= size or not (gt == np.round(gt)).all():
            raise ValueError(f"task {type(env).__name__}: trial {k} of {split} has targets {np.unique(gt)[:8]} that "
                             f"are not its {size} actions")
        gt = gt.astype(np.int64)
    else:
        gt = gt.astype(np.float32).reshape(T, -1)
        if gt.shape[1] != size:
            raise ValueError(f"task {type(env).__name__}: trial {k} of {split} has {gt.shape[1]} targets per step, "
                             f"the task's first trial {size}")
    return Trial(ob, gt, static_steps(ob, periods, static), decision[1] - 1, decision, scalars, periods)


class TrialSet(Dataset):
    """The trials of a split: n drawn once and kept (validation, test), or drawn on demand by index
    (training: n trials an epoch, epoch e asks for trials e·n … e·n + n − 1, [`EpochTrials`][fprnn.data.tasks.EpochTrials]).
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


class NeuroGymDataModule(TrialData):
    """A NeuroGym task as training, validation and test trials (see the module docstring).

    ``task``: a NeuroGym id, or ``module:Class`` for a TrialEnv subclass of your own; ``kwargs``:
    the env's options (timing, dim_ring, use_expl_context…); ``dt``: the time step in ms (NeuroGym's
    and the network's). ``train_trials`` fresh trials make an epoch; ``val_trials`` and
    ``test_trials`` are drawn once. ``decision_weight``: the loss weight of the decision period's
    steps relative to the others (Yang et al. 2019 use 5); ``decision_period``: the period whose
    last step is the answer (tasks without one answer at their last step). ``conditions``: the keys
    of NeuroGym's trial info that make a condition for the test performance per condition (default:
    context and coherence, those a task has; for ContextDecisionMaking ``coh`` is the coherence of
    the modality the context makes relevant). ``task_kwargs``: options per task id, used when that
    task is the one chosen (a preset's well-posed timings), with ``kwargs`` merged over them — so
    that ``kwargs={}`` with another ``task`` gives that task its own defaults."""

    def __init__(self, task: str = "ContextDecisionMaking-v0", kwargs: dict | None = None, dt: float = 20,
                 static: str = "auto", decision_weight: float = 5.0, decision_period: str = "decision",
                 batch_size: int = 64, eval_batch_size: int = 512, train_trials: int = 6400,
                 val_trials: int = 512, test_trials: int = 1024, seed: int = 0,
                 conditions: list[str] | None = None, task_kwargs: dict | None = None, loss: str = "auto"):
        super().__init__(batch_size, eval_batch_size, seed, loss)
        for name, v in (("train_trials", train_trials), ("val_trials", val_trials), ("test_trials", test_trials)):
            positive_int(name, v)
        number("dt", dt, strict=True)
        number("decision_weight", decision_weight)
        if not isinstance(static, str):
            raise ValueError(f"static must be 'auto', 'none' or a period name, got {static!r}")
        self.env_id = self.name = task
        self.kwargs, self.dt, self.static = merged(dict(task_kwargs or {}).get(task, {}), kwargs or {}), dt, static
        self.decision_weight, self.decision_period = float(decision_weight), decision_period
        self.train_trials, self.val_trials, self.test_trials = train_trials, val_trials, test_trials
        self.condition_keys = list(conditions) if conditions is not None else list(CONDITIONS)
        self.env = make_env(task, dt, self.kwargs)
        self._targets = None
        first = self.draw("train", 0)
        self.n_in = int(first.ob.shape[1])
        self._targets = self.targets, self.n_out = target_kind(self.env, np.asarray(self.env.gt))
        self._check_loss()
        self._static_note(first, static)

    def draw(self, split: str, k: int) -> Trial:
        return draw_trial(self.env, self.seed, split, k, self.static, self.decision_period, self._targets)


#: the keys of a trials file: required, then optional
FILE_KEYS = ("inputs", "targets", "mask", "static", "answer", "conditions", "condition_names")


class TrialFileDataModule(TrialData):
    """Trials a user generated, from a ``.npz`` file (``path``) with the keys

    - ``inputs`` (n, T, n_in) float; ``targets`` (n, T) integer actions or (n, T, n_out) float;
    - optional ``mask`` (n, T): the loss weight of each step (0: ignored; default 1 everywhere);
    - optional ``static`` (n,): leading steps of constant input (default: found from the data, as
      long as the input stays equal to its first step; ``static="none"`` for none);
    - optional ``answer`` (n,): the step whose output is the trial's answer (performance, for
      actions; default: the last step of weight > 0);
    - optional ``conditions`` (n, k) numbers with ``condition_names`` (k,): what makes a condition.

    The trials are split by ``seed`` into ``test_fraction`` and ``val_fraction`` held out and the
    rest for training, shuffled anew every epoch by (seed, epoch). Every bad key gets one line with
    its name, its shape and what is expected."""

    def __init__(self, path: str | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
                 static: str = "auto", batch_size: int = 64, eval_batch_size: int = 512, seed: int = 0,
                 loss: str = "auto", dt: float | None = None):
        super().__init__(batch_size, eval_batch_size, seed, loss)
        if path is None:
            raise ValueError("data.path is missing: give the .npz file of your trials (keys inputs, targets and "
                             "optionally mask, static, answer, conditions, condition_names)")
        for name, v in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            number(name, v)
        if val_fraction + test_fraction >= 1:
            raise ValueError(f"val_fraction + test_fraction must leave trials to train on, got "
                             f"{val_fraction} + {test_fraction}")
        if static not in ("auto", "none"):
            raise ValueError(f"static must be 'auto' or 'none' (or give the file a static key), got {static!r}")
        self.path, self.name, self.dt = Path(path), Path(path).name, dt
        self.trials, self.condition_keys = load_trials(self.path, static)
        n = len(self.trials)
        self.test_trials, self.val_trials = round(n * test_fraction), round(n * val_fraction)
        order = np.random.default_rng(np.random.SeedSequence([int(seed), 3])).permutation(n)
        self.split_ids = {"test": order[:self.test_trials],
                          "val": order[self.test_trials:self.test_trials + self.val_trials],
                          "train": order[self.test_trials + self.val_trials:]}
        self.train_trials = len(self.split_ids["train"])
        if val_fraction and not self.val_trials or test_fraction and not self.test_trials:
            raise ValueError(f"{self.path}: {n} trials leave no validation or test trial at val_fraction="
                             f"{val_fraction}, test_fraction={test_fraction}")
        clamped = None
        if self.train_trials < batch_size:      # a small file still trains: one batch an epoch
            self.batch_size = self.train_trials
            clamped = (f"{self.path}: {self.train_trials} training trials, fewer than data.batch_size={batch_size}: "
                       f"each batch is all of them")
        first = self.trials[0]
        self.n_in = int(first.ob.shape[1])
        self.targets = "actions" if first.gt.ndim == 1 else "continuous"
        self.n_out = (int(max(t.gt.max() for t in self.trials)) + 1 if self.targets == "actions"
                      else int(first.gt.shape[1]))
        self._check_loss()
        self._static_note(first, static)
        self.note = "; ".join(n for n in (self.note, clamped) if n) or None

    def draw(self, split: str, k: int) -> Trial:
        ids = self.split_ids[split]
        if split != "train":
            return self.trials[ids[k]]
        epoch, j = divmod(int(k), len(ids))      # epoch e's trials in an order drawn from (seed, e)
        order = np.random.default_rng(np.random.SeedSequence([int(self.seed), 0, epoch])).permutation(len(ids))
        return self.trials[ids[order[j]]]


def _key(data, name: str, path: Path):
    v = np.asarray(data[name])
    if v.dtype == object:
        raise ValueError(f"{path}: key {name!r} holds Python objects (shape {v.shape}); save plain numeric arrays")
    return v


def load_trials(path: Path, static: str) -> tuple[list[Trial], list[str]]:
    """The trials of a ``.npz`` file ([`TrialFileDataModule`][fprnn.data.tasks.TrialFileDataModule]), each key checked."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such trials file")
    try:
        data = np.load(path, allow_pickle=False)
        keys = set(data.files)
    except Exception as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    unknown = sorted(keys - set(FILE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; a trials file has {', '.join(FILE_KEYS)}")
    for k in ("inputs", "targets"):
        if k not in keys:
            raise ValueError(f"{path}: key {k!r} is missing (required: inputs (n, T, n_in), targets (n, T) actions "
                             f"or (n, T, n_out))")
    x, y = _key(data, "inputs", path), _key(data, "targets", path)
    if x.ndim != 3 or not np.issubdtype(x.dtype, np.number) or x.shape[0] < 1 or x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"{path}: key 'inputs' has shape {x.shape} ({x.dtype}); expected numbers (n, T, n_in)")
    n, T, _ = x.shape
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: key 'inputs' has non-finite values")
    if y.ndim == 2 and y.shape == (n, T):
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{path}: key 'targets' has shape {y.shape} but dtype {y.dtype}; (n, T) targets are "
                             f"integer actions — for one continuous output give (n, T, 1)")
        y = y.astype(np.int64)
    elif y.ndim == 3 and y.shape[:2] == (n, T) and y.shape[2] >= 1 and np.issubdtype(y.dtype, np.number):
        y = y.astype(np.float32)
    else:
        raise ValueError(f"{path}: key 'targets' has shape {y.shape}; expected ({n}, {T}) integer actions or "
                         f"({n}, {T}, n_out) numbers, matching inputs {x.shape}")

    def optional(name, shape, kind):
        if name not in keys:
            return None
        v = _key(data, name, path)
        if v.dtype == bool:
            v = v.astype(np.int64)
        whole = kind is np.integer and np.issubdtype(v.dtype, np.floating) and bool(np.isfinite(v).all()) \
            and bool((v == np.round(v)).all())      # step counts saved as floats
        if v.shape != shape or not (np.issubdtype(v.dtype, kind) or whole):
            raise ValueError(f"{path}: key {name!r} has shape {v.shape} ({v.dtype}); expected "
                             f"{'integers' if kind is np.integer else 'numbers'} of shape {shape}")
        return v.astype(np.int64) if kind is np.integer else v

    mask = optional("mask", (n, T), np.number)
    if mask is not None and (not np.isfinite(mask).all() or mask.min() < 0 or mask.sum() <= 0):
        raise ValueError(f"{path}: key 'mask' must be finite loss weights ≥ 0, not all 0 (min {mask.min()}, "
                         f"sum {mask.sum()})")
    weight = (np.ones((n, T)) if mask is None else mask).astype(np.float32)
    if y.ndim == 3 and not np.isfinite(y).all():    # NaN padding is fine where the mask ignores it
        if mask is None or (weight[~np.isfinite(y).all(2)] > 0).any():
            raise ValueError(f"{path}: key 'targets' has non-finite values at steps of weight > 0 (allowed only where "
                             f"mask is 0)")
        y = np.where(np.isfinite(y), y, 0).astype(np.float32)
    if y.ndim == 2 and y.min() < 0:        # padding labels (-1, -100) are fine where the mask ignores them
        if mask is None or (weight[y < 0] > 0).any():
            raise ValueError(f"{path}: key 'targets' has action {int(y.min())} at a step of weight > 0; actions are "
                             f"integers ≥ 0 (negative ones only where mask is 0)")
        y = np.where(y < 0, 0, y)
    given_static = optional("static", (n,), np.integer)
    if given_static is not None:
        if given_static.min() < 0 or given_static.max() > T:
            raise ValueError(f"{path}: key 'static' must hold step counts in [0, {T}], got {given_static.min()} … "
                             f"{given_static.max()}")
        for i, s in enumerate(given_static):
            if not (x[i, :s] == x[i, :1]).all():
                raise ValueError(f"{path}: key 'static' says trial {i} holds its input for {s} steps, but its input "
                                 f"changes before step {s}")
    answer = optional("answer", (n,), np.integer)
    if answer is not None and (answer.min() < 0 or answer.max() >= T):
        raise ValueError(f"{path}: key 'answer' must hold steps in [0, {T - 1}], got {answer.min()} … {answer.max()}")
    conditions = _key(data, "conditions", path) if "conditions" in keys else None
    if conditions is not None:
        if conditions.ndim == 1:
            conditions = conditions[:, None]
        if conditions.ndim != 2 or len(conditions) != n or conditions.dtype.kind not in "biufU":
            raise ValueError(f"{path}: key 'conditions' has shape {conditions.shape} ({conditions.dtype}); expected "
                             f"numbers or strings of shape ({n}, k)")
    names = [f"c{j}" for j in range(0 if conditions is None else conditions.shape[1])]
    if "condition_names" in keys:
        v = _key(data, "condition_names", path)
        if conditions is None or v.shape != (len(names),):
            raise ValueError(f"{path}: key 'condition_names' has shape {v.shape}; expected one name per column of "
                             f"'conditions' ({len(names)},)")
        names = [str(s) for s in v]
    trials = []
    for i in range(n):
        ob = x[i].astype(np.float32)
        if given_static is not None:
            s = int(given_static[i])
        elif static == "auto":
            s = int(np.argmax(~(ob == ob[0]).all(1))) if not (ob == ob[0]).all() else T
        else:
            s = 0
        weighted = np.nonzero(weight[i] > 0)[0]
        a = int(answer[i]) if answer is not None else int(weighted[-1]) if len(weighted) else T - 1
        info = {} if conditions is None else {k: c.item() for k, c in zip(names, conditions[i])}
        trials.append(Trial(ob, y[i], s, a, (a, a + 1), info, [("static", 0, s), ("trial", s, T)], weight[i]))
    return trials, names
