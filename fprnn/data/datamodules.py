"""LightningDataModules: torchvision image sets (MNIST, section 3.2, and its family), users' own
arrays, and the synthetic linear regression (eq 3.4)."""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from fprnn.core.checks import positive_int
from fprnn.data import vision
from fprnn.models.dense import get_dtype


class EpochShuffle(Sampler[int]):
    """The data order: a permutation drawn from (seed, epoch) alone — not from the global RNG,
    so a resumed run sees the same batches — and sharded over ``world`` devices so that global
    batch t (``batch`` samples) is exactly the single-device batch t, split into equal parts:
    rank k takes every world-th sample of it. Lightning calls ``set_epoch``."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world: int = 1,
                 batch: int | None = None, skip: tuple[int, int] | None = None):
        self.n, self.seed, self.shuffle, self.epoch = n, int(seed), shuffle, 0
        self.skip = skip   # (epoch, samples of this device's stream already consumed): a resume
        self.rank, self.world = rank, world
        self.batch = batch or world
        # drop the tail that cannot be split equally, so every device runs the same steps
        full, rest = divmod(n, self.batch)
        self.used = full * self.batch + (rest // world) * world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self):
        mine = self._order()[: self.used][self.rank:: self.world]
        if self.skip is not None and self.skip[0] == self.epoch:   # (Lightning may iter() twice)
            mine = mine[self.skip[1]:]
        return iter(mine.tolist())

    def __len__(self) -> int:
        return self.used // self.world


def dist_info(module: pl.LightningDataModule) -> tuple[int, int]:
    """(rank, world size) of the trainer a data module is attached to; (0, 1) without one."""
    t = getattr(module, "trainer", None)
    return (t.global_rank, t.world_size) if t is not None else (0, 1)


class ResumableData(pl.LightningDataModule, ABC):
    """The base of fprnn's data modules: what every one declares
    ([`fprnn.data.protocol.FixedPointData`][fprnn.data.protocol.FixedPointData]), with the defaults of a
    static problem (``probe_batch`` each one gives), and where in the epoch training stood, saved so that a run resumed from a
    mid-epoch checkpoint (an interrupted one) continues with exactly the batches it had not seen."""

    task: str = "classification"
    objective: str = "static"
    name: str | None = None
    n_in: int | None = None
    n_out: int | None = None
    N: int | None = None
    units: torch.Tensor | None = None
    image_shape: tuple[int, int, int] | None = None
    targets: str | None = None
    note: str | None = None
    teacher = None
    val_on_test: bool = True
    val_size: int = 0
    validation: str | None = None
    _resume: tuple[int, int] | None = None

    @abstractmethod
    def probe_batch(self, k: int = 16):
        """k training inputs and their targets, for the monitors and the final numbers."""

    def weights_loss(self, model) -> dict[str, float] | None:
        """The task's loss as a closed-form function of the trained W, where it has one (None)."""
        return None

    def state_dict(self) -> dict:
        t = getattr(self, "trainer", None)
        if t is None or not t.training:
            return {}
        done = int(t.fit_loop.epoch_loop.batch_progress.current.completed)
        if done >= t.num_training_batches:   # saved at an epoch's end: nothing to skip
            return {}
        return {"epoch": int(t.current_epoch), "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self._resume = (int(state["epoch"]), int(state["batches_done"]))

    def _skip(self, per_device_batch: int) -> tuple[int, int] | None:
        if self._resume is None:
            return None
        epoch, done = self._resume
        self._resume = None
        return (epoch, done * per_device_batch)


def per_device(batch_size: int, world: int) -> int:
    """Each device's share of the global ``batch_size`` over ``world`` devices; it must divide evenly."""
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} is the global batch and must divide evenly over "
                         f"{world} devices")
    return batch_size // world


def _check_split(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 \
            or (v >= 1 and not float(v).is_integer()):
        raise ValueError(f"{name} must be a count (0, 1, 2, …) or a fraction in [0, 1), got {v!r}")


def _split_count(name: str, v, n: int) -> int:
    """A split size given as a count (int ≥ 0) or a fraction of n (0 ≤ v < 1)."""
    _check_split(name, v)
    k = int(round(v * n)) if v < 1 else int(v)
    if k >= n:
        raise ValueError(f"{name}={v!r} takes {k} of the {n} samples and leaves none to train on")
    return k


def split_indices(n: int, k: int, seed: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out): k of range(n) held out, drawn by (seed, stream), both sorted. With k = 0
    the kept indices are range(n) in order, so a run without a split is the run it always was."""
    if k == 0:
        return torch.arange(n), torch.arange(0)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 7919 * (stream + 1))
    perm = torch.randperm(n, generator=g)
    return perm[k:].sort().values, perm[:k].sort().values


class TensorData(ResumableData):
    """Train, validation and test tensors, with the exact-resume sampler. ``batch_size`` is the
    global batch: with several devices each takes an equal share of it.

    Validation runs each epoch on ``val_size`` samples held out of the training set (drawn by the
    seed); the test set is read only by ``trainer.test``. ``val_size=0`` turns validation off,
    unless ``val_on_test`` — the paper's protocol, which reports the test set each epoch (its
    presets use it; do not tune on it)."""

    def __init__(self, batch_size: int = 512, eval_batch_size: int = 2000, val_size=0,
                 val_on_test: bool = False, seed: int = 0, shuffle: bool = True, num_workers: int = 0):
        super().__init__()
        positive_int("batch_size", batch_size)
        positive_int("eval_batch_size", eval_batch_size)
        _check_split("val_size", val_size)   # its size is checked once n is known
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.val_on_test = val_size, bool(val_on_test)
        self.seed, self.shuffle, self.num_workers = int(seed), shuffle, num_workers
        self.train_set = self.val_set = self.test_set = None

    def _set_splits(self, x, y, xt, yt) -> None:
        keep, held = split_indices(len(x), _split_count("val_size", self.val_size, len(x)), self.seed)
        self.train_idx, self.val_idx = keep, held
        self.train_set = TensorDataset(x[keep], y[keep])
        self.val_set = TensorDataset(x[held], y[held]) if len(held) else None
        self.test_set = TensorDataset(xt, yt)

    def probe_batch(self, k: int = 16):
        """A fixed batch of k training inputs, for stability probes."""
        self.setup()
        return self.train_set.tensors[0][:k], self.train_set.tensors[1][:k]

    def train_dataloader(self):
        rank, world = dist_info(self)
        bs = per_device(self.batch_size, world)
        sampler = EpochShuffle(len(self.train_set), self.seed, self.shuffle, rank, world, self.batch_size,
                               skip=self._skip(bs))
        return DataLoader(self._training_samples(sampler), batch_size=bs, sampler=sampler,
                          num_workers=self.num_workers)

    def _training_samples(self, sampler: EpochShuffle) -> Dataset:
        """What the training loader reads, in the order of ``sampler`` (the image sets augment it)."""
        return self.train_set

    def _eval_loader(self, ds):
        rank, world = dist_info(self)
        return DataLoader(ds, batch_size=max(self.eval_batch_size // world, 1),
                          sampler=EpochShuffle(len(ds), shuffle=False, rank=rank, world=world,
                                               batch=self.eval_batch_size),
                          num_workers=self.num_workers)

    def val_dataloader(self):
        ds = self.test_set if self.val_on_test else self.val_set
        return [] if ds is None else self._eval_loader(ds)

    def test_dataloader(self):
        return self._eval_loader(self.test_set)

    @property
    def validation(self) -> str:
        """What per-epoch validation reads, for results.json and the figures."""
        if self.val_on_test:
            return "test set"
        return f"held-out split of {len(self.val_idx)}" if self.val_set is not None else "none"


class Augmented(Dataset):
    """Training images, each drawn with a random horizontal flip and a shift of up to ``shift``
    pixels (the vacated border zero), by torchvision's functional transforms. The draws come from
    (seed, epoch) alone, as the shuffle does, so a resumed run sees the same augmented batches: the
    epoch is the training sampler's (Lightning sets it)."""

    def __init__(self, base: TensorDataset, shape, flip: bool, shift: int, seed: int, sampler: EpochShuffle):
        self.x, self.y = base.tensors
        self.shape, self.flip, self.shift, self.seed, self.sampler = tuple(shape), flip, shift, seed, sampler
        self._epoch = None

    def __len__(self):
        return len(self.x)

    def _draw(self, epoch: int) -> None:
        # offset from the shuffle's seed, so that the draws are not the batch order's random numbers again
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 104_729)
        n = len(self.x)
        # flips drawn whether or not they are used, so that the moves are the same draws either way
        self._flips = torch.rand(n, generator=g) < 0.5
        self._moves = torch.randint(-self.shift, self.shift + 1, (n, 2), generator=g)
        self._epoch = epoch

    def __getitem__(self, i):
        # imported here, not kept on self: slow to import (only runs that augment pay for it), and a
        # module would not pickle for spawned loader workers; after the first item it is a lookup
        from torchvision.transforms.v2 import functional as TF
        if self._epoch != self.sampler.epoch:
            self._draw(self.sampler.epoch)
        img = self.x[i].view(self.shape)
        if self.flip and self._flips[i]:
            img = TF.horizontal_flip(img)
        if self.shift:
            s = self.shift
            dy, dx = self._moves[i].tolist()
            img = TF.crop(TF.pad(img, [s, s, s, s]), s - dy, s - dx, self.shape[1], self.shape[2])
        return img.reshape(-1), self.y[i]


class VisionDataModule(TensorData):
    """A torchvision image set (``dataset``: mnist, fashion_mnist, kmnist, cifar10), flattened
    channels first, pixels in [0, 1]; ``grayscale`` maps colour to luminance. ``train_subset`` /
    ``test_subset`` take the first k training (after the validation split) / test images.
    ``flip`` / ``shift`` augment the training images (see ``Augmented``; a flip suits clothing,
    not digits); validation and test images are never augmented."""

    task = "classification"

    def __init__(self, dataset: str = "mnist", root: str = "data", download: bool = True,
                 grayscale: bool = False, train_subset: int | None = None, test_subset: int | None = None,
                 flip: bool = False, shift: int = 0, **split):
        super().__init__(**split)
        positive_int("train_subset", train_subset, allow_none=True)
        positive_int("test_subset", test_subset, allow_none=True)
        if not isinstance(flip, bool):
            raise ValueError(f"flip must be true or false, got {flip!r}")
        self.spec = vision.get_set(dataset)
        self.name, self.root, self.download, self.grayscale = dataset, root, download, bool(grayscale)
        self.train_subset, self.test_subset = train_subset, test_subset
        self.n_in, self.n_out = self.spec.n_in(self.grayscale), self.spec.n_classes
        c, h, w = self.spec.shape
        self.image_shape = (1 if self.grayscale else c, h, w)    # what a conv encoder unflattens
        if isinstance(shift, bool) or not isinstance(shift, int) or not 0 <= shift < min(h, w):
            raise ValueError(f"shift must be a whole number of pixels in [0, {min(h, w)}) for {dataset}, "
                             f"got {shift!r}")
        self.flip, self.shift = flip, shift

    def prepare_data(self) -> None:
        vision.ensure(self.spec, self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        kw = dict(root=self.root, download=self.download, grayscale=self.grayscale)
        x, y = vision.load(self.name, train=True, **kw)
        xt, yt = vision.load(self.name, train=False, **kw)
        self._set_splits(x, y, xt[: self.test_subset], yt[: self.test_subset])
        if self.train_subset:
            self.train_set = TensorDataset(*(t[: self.train_subset] for t in self.train_set.tensors))

    def _training_samples(self, sampler: EpochShuffle) -> Dataset:
        if not (self.flip or self.shift):
            return self.train_set
        return Augmented(self.train_set, self.image_shape, self.flip, self.shift, self.seed, sampler)


class _Repeat(Dataset):
    """The full batch as one item, ``n`` times: one epoch = n full-batch steps."""

    def __init__(self, tensors, n):
        self.tensors, self.n = tensors, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.tensors


class LinearRegressionDataModule(ResumableData):
    """The linear task of section 3.1, eq 3.4: X = σx Z (N×m), Ŵ = σw Z/√N,
    Y = (I − Ŵ)⁻¹ X + σy Z. Batches are rows: (X (m, N), Y (m, N)), always the full batch.
    ``steps_per_epoch`` full-batch steps make one epoch (validation runs between epochs)."""

    task = "regression"
    n_out = None

    def __init__(self, N: int = 200, m: int = 100, sigma_x: float = 0.1, sigma_y: float = 0.01,
                 sigma_w: float = 0.5, seed: int = 0, dtype: str = "float64", steps_per_epoch: int = 100):
        super().__init__()
        positive_int("N", N)
        positive_int("m", m)
        positive_int("steps_per_epoch", steps_per_epoch)
        for name, v in (("sigma_x", sigma_x), ("sigma_y", sigma_y), ("sigma_w", sigma_w)):
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {v!r}")
        self.N, self.m, self.steps_per_epoch = N, m, steps_per_epoch
        self.n_in = None
        dt = get_dtype(dtype)
        g = torch.Generator().manual_seed(int(seed) + 12345)
        Z = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
        X = sigma_x * Z(N, m)
        self.W_hat = sigma_w * Z(N, N) / math.sqrt(N)
        Y = torch.linalg.solve(torch.eye(N, dtype=torch.float64) - self.W_hat, X) + sigma_y * Z(N, m)
        self.X, self.Y = X.T.contiguous().to(dt), Y.T.contiguous().to(dt)   # rows = samples

    def W_star(self) -> torch.Tensor:
        """The minimum-norm minimiser, eq 3.3: W∗ = (Y − X) Y⁺ (columns = samples)."""
        X, Y = self.X.T, self.Y.T
        return (Y - X) @ torch.linalg.pinv(Y)

    def loss(self, W: torch.Tensor) -> float:
        """J(W) = (1/m) ‖(I − W)⁻¹ X − Y‖²_F, eq 3.1."""
        X, Y = self.X.T.to(W.dtype), self.Y.T.to(W.dtype)
        R = torch.linalg.solve(torch.eye(self.N, dtype=W.dtype, device=W.device) - W, X.to(W.device))
        return float(((R - Y.to(W.device)) ** 2).sum() / self.m)

    def weights_loss(self, model) -> dict[str, float]:
        """J of the trained W and of the minimiser W∗ (eq 3.3)."""
        W = model.W.detach()
        return {"loss_W": self.loss(W), "loss_W_star": self.loss(self.W_star().to(W.dtype))}

    def probe_batch(self, k: int = 16):
        return self.X[:k], self.Y[:k]

    def setup(self, stage: str | None = None) -> None:
        pass

    def _shard(self):
        rank, world = dist_info(self)
        per_device(self.m, world)
        return self.X[rank::world], self.Y[rank::world]

    def train_dataloader(self):
        return DataLoader(_Repeat(self._shard(), self.steps_per_epoch), batch_size=None,
                          sampler=EpochShuffle(self.steps_per_epoch, shuffle=False, skip=self._skip(1)))

    def val_dataloader(self):
        return DataLoader(_Repeat(self._shard(), 1), batch_size=None)

    test_dataloader = val_dataloader


class ArraysDataModule(TensorData):
    """A user's own data from a ``.npz`` or ``.pt`` file (a dict of arrays):

    - ``X`` (n, d) features with ``y`` (n,) integer labels in [0, C) → classification through
      the read-out (C = ``n_classes``, or the largest label + 1);
    - or ``X`` with ``Y`` (n, k) real targets → regression through the read-out (squared error);
    - optional ``X_test`` with ``y_test`` / ``Y_test``; otherwise ``test_size`` of the rows are
      held out as the test set, and ``val_size`` of the rest for validation (both by the seed).

    ``normalize`` standardizes every feature with the training split's mean and std, kept as
    ``mean`` and ``std`` to apply to new inputs."""

    def __init__(self, path: str, test_size=0.2, normalize: bool = False, n_classes: int | None = None,
                 batch_size: int = 256, val_size=0.1, **split):
        super().__init__(batch_size=batch_size, val_size=val_size, **split)
        _check_split("test_size", test_size)
        positive_int("n_classes", n_classes, allow_none=True)
        self.path, self.name = Path(path).expanduser(), "arrays"
        self.test_size, self.normalize = test_size, bool(normalize)
        arrays = self._read()
        self.task = "classification" if "y" in arrays else "regression"
        X, T = arrays["X"], arrays["y" if self.task == "classification" else "Y"]
        if "X_test" in arrays:
            Xt, Tt = arrays["X_test"], arrays.get("y_test" if self.task == "classification" else "Y_test")
            if Tt is None:
                raise ValueError(f"{self.path}: X_test is given without "
                                 f"{'y_test' if self.task == 'classification' else 'Y_test'}")
        else:
            keep, held = split_indices(len(X), _split_count("test_size", test_size, len(X)), self.seed, stream=1)
            X, T, Xt, Tt = X[keep], T[keep], X[held], T[held]
        if self.task == "classification":
            labels = torch.cat([T, Tt])
            self.n_out = n_classes or int(labels.max()) + 1
            if int(labels.max()) >= self.n_out:
                raise ValueError(f"{self.path}: label {int(labels.max())} found, but n_classes={self.n_out} "
                                 f"(labels must be integers in [0, {self.n_out}))")
        else:
            self.n_out = T.shape[1]
        self.n_in = X.shape[1]
        self._set_splits(X, T, Xt, Tt)
        if self.normalize:
            x = self.train_set.tensors[0]
            mean, std = x.mean(0), x.std(0)
            std = torch.where(std > 0, std, torch.ones_like(std))   # a constant feature stays 0
            self.mean, self.std = mean, std
            for ds in (self.train_set, self.val_set, self.test_set):
                if ds is not None:
                    ds.tensors = ((ds.tensors[0] - mean) / std, ds.tensors[1])

    def _read(self) -> dict[str, torch.Tensor]:
        return self._validated(read_arrays(self.path))

    def _validated(self, raw: dict) -> dict[str, torch.Tensor]:
        where = f"data.path={self.path}"
        if "X" not in raw:
            raise ValueError(f"{where}: no array 'X' (found {sorted(raw)}); expected X with y or Y")
        if ("y" in raw) == ("Y" in raw):
            raise ValueError(f"{where}: expected exactly one of 'y' (integer labels, classification) or "
                             f"'Y' (real targets, regression), found {sorted(raw)}")
        target = "y" if "y" in raw else "Y"
        out = {}
        for split in ("", "_test"):
            if "X" + split in raw:
                X = out["X" + split] = _features(where, "X" + split, raw["X" + split])
                if target + split in raw:
                    check = _labels if target == "y" else _targets
                    out[target + split] = check(where, target + split, raw[target + split], len(X), "X" + split)
        for name, what in (("X", "features"), ("Y", "targets")):
            if name + "_test" in out and out[name + "_test"].shape[1] != out[name].shape[1]:
                raise ValueError(f"{where}: {name}_test has {out[name + '_test'].shape[1]} {what}, "
                                 f"{name} has {out[name].shape[1]}")
        return out

    def setup(self, stage: str | None = None) -> None:
        pass                         # read and split at construction (its sizes are needed early)


def read_arrays(path: Path) -> dict[str, torch.Tensor]:
    """The arrays of a ``.npz`` or ``.pt`` file (a dict of tensors), with errors that name it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data.path={path}: no such file")
    if path.suffix == ".npz":
        import numpy as np
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: torch.from_numpy(f[k]) for k in f.files}
        except Exception as e:
            raise ValueError(f"data.path={path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if path.suffix == ".pt":
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"data.path={path}: not a readable .pt file ({type(e).__name__})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"data.path={path}: holds a {type(raw).__name__}, expected a dict of tensors")
        return {k: torch.as_tensor(v) for k, v in raw.items()}
    raise ValueError(f"data.path={path}: unknown file type {path.suffix!r}; use .npz or .pt")


class ResponsesDataModule(TensorData):
    """Recorded steady-state responses to fit: a ``.npz``/``.pt`` file (or ``arrays``) with
    stimuli ``X`` (n, d), the recorded rates ``R`` (n, k) and ``units`` (k,), the indices of the
    recorded units among the network's N; optional held-out ``X_test`` / ``R_test``, otherwise
    ``test_size`` of the stimuli are held out. The loss is the squared error of those units'
    fixed-point rates (no read-out), so δ is nonzero on recorded units only. ``direct=True``
    feeds X as the network's input itself (d = N, model.n_in=null), else through a read-in."""

    task = "regression"

    def __init__(self, path: str | None = None, test_size=0.2, direct: bool = False, arrays: dict | None = None,
                 batch_size: int = 64, val_size=0.1, **split):
        super().__init__(batch_size=batch_size, val_size=val_size, **split)
        _check_split("test_size", test_size)
        if (path is None) == (arrays is None):
            raise ValueError("responses data: give data.path (a .npz or .pt file)")
        where = f"data.path={path}" if path is not None else "responses"
        raw = read_arrays(Path(path)) if path is not None else {k: torch.as_tensor(v) for k, v in arrays.items()}
        missing = [k for k in ("X", "R", "units") if k not in raw]
        if missing:
            raise ValueError(f"{where}: missing {missing} (found {sorted(raw)}); expected X (n, d) stimuli, "
                             f"R (n, k) recorded rates and units (k,) their indices")
        X = _features(where, "X", raw["X"])
        R = _targets(where, "R", raw["R"], len(X), "X")
        units = raw["units"]
        if units.dim() != 1 or len(units) != R.shape[1] or units.is_floating_point() \
                or len(set(units.tolist())) != len(units) or int(units.min()) < 0:
            raise ValueError(f"{where}: units must be {R.shape[1]} distinct non-negative integer indices (one per "
                             f"column of R), got {units.tolist()[:10]}")
        if "X_test" in raw:
            if "R_test" not in raw:
                raise ValueError(f"{where}: X_test is given without R_test")
            Xt = _features(where, "X_test", raw["X_test"])
            Rt = _targets(where, "R_test", raw["R_test"], len(Xt), "X_test")
            if Xt.shape[1] != X.shape[1] or Rt.shape[1] != R.shape[1]:
                raise ValueError(f"{where}: X_test/R_test have {Xt.shape[1]}/{Rt.shape[1]} columns, X/R "
                                 f"{X.shape[1]}/{R.shape[1]}")
        else:
            keep, held = split_indices(len(X), _split_count("test_size", test_size, len(X)), self.seed, stream=1)
            X, R, Xt, Rt = X[keep], R[keep], X[held], R[held]
        self.name, self.units = "responses", units.long()
        self.n_in, self.n_out = (None if direct else X.shape[1]), None
        if direct:
            self.N = X.shape[1]
        self._set_splits(X, R, Xt, Rt)

    def setup(self, stage: str | None = None) -> None:
        pass


def _features(where: str, name: str, X: torch.Tensor) -> torch.Tensor:
    if X.dim() != 2 or X.shape[0] == 0:
        raise ValueError(f"{where}: {name} must be (n, d) with n ≥ 1, got shape {tuple(X.shape)}")
    if X.is_complex() or X.dtype == torch.bool:
        raise ValueError(f"{where}: {name} must be real numbers, got {X.dtype}")
    bad = int((~torch.isfinite(X.double())).any(1).sum())
    if bad:
        raise ValueError(f"{where}: {name} has NaN or inf values in {bad} rows")
    return X.float()


def _labels(where: str, name: str, y: torch.Tensor, n: int, rows: str) -> torch.Tensor:
    if y.dim() != 1 or len(y) != n:
        raise ValueError(f"{where}: {name} must be ({n},) like {rows}'s rows, got shape {tuple(y.shape)}")
    yd = y.double()
    ok = torch.isfinite(yd) & (yd == yd.round()) & (yd >= 0)
    if not bool(ok.all()):
        raise ValueError(f"{where}: {name} must hold integer labels in [0, C); found values such as "
                         f"{yd[~ok][:3].tolist()}")
    return y.long()


def _targets(where: str, name: str, Y: torch.Tensor, n: int, rows: str) -> torch.Tensor:
    Y = Y.unsqueeze(1) if Y.dim() == 1 else Y
    if Y.dim() != 2 or len(Y) != n:
        raise ValueError(f"{where}: {name} must be ({n}, k) like {rows}'s rows, got shape {tuple(Y.shape)}")
    if not torch.isfinite(Y.double()).all():
        raise ValueError(f"{where}: {name} has NaN or inf values")
    return Y.float()
