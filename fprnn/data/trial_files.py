"""Trials a user generated (PsychRNN's and nn4n's convention: inputs, targets and a mask per step)
from a ``.npz`` file, as trials ([`fprnn.data.trials`][fprnn.data.trials])."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fprnn.core.checks import number
from fprnn.data.trials import Trial, TrialData, constant_prefix


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
    """The trials of a ``.npz`` file ([`TrialFileDataModule`][fprnn.data.trial_files.TrialFileDataModule]), each key checked."""
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
            if s > constant_prefix(x[i]):
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
        else:     # a file's trial has no periods: it holds as long as its input does
            s = constant_prefix(ob) if static == "auto" else 0
        weighted = np.nonzero(weight[i] > 0)[0]
        a = int(answer[i]) if answer is not None else int(weighted[-1]) if len(weighted) else T - 1
        info = {} if conditions is None else {k: c.item() for k, c in zip(names, conditions[i])}
        trials.append(Trial(ob, y[i], s, a, (a, a + 1), info, [("static", 0, s), ("trial", s, T)], weight[i]))
    return trials, names
