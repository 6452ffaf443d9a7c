"""LightningDataModules: MNIST (section 3.2) and the synthetic linear regression (eq 3.4)."""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from .mnist import load_mnist
from .model import get_dtype


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


def _dist(module: pl.LightningDataModule) -> tuple[int, int]:
    """(rank, world size) of the attached trainer; (0, 1) without one."""
    t = getattr(module, "trainer", None)
    return (t.global_rank, t.world_size) if t is not None else (0, 1)


class ResumableData(pl.LightningDataModule):
    """Saves where in the epoch training stood, so that a run resumed from a mid-epoch
    checkpoint (an interrupted one) continues with exactly the batches it had not seen."""

    _resume: tuple[int, int] | None = None

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


def _per_device(batch_size: int, world: int) -> int:
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} is the global batch and must divide evenly over "
                         f"{world} devices")
    return batch_size // world


def _positive_int(name, v, allow_none=False):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive integer{' or null' if allow_none else ''}, got {v!r}")


class MNISTDataModule(ResumableData):
    """Flattened MNIST, pixels in [0, 1]. Validation and test use the full 10,000-image test set
    (``test_subset`` takes its first k images instead, for quick checks). ``batch_size`` is the
    global batch: with several devices each takes an equal share of it."""

    task = "classification"
    n_in, n_out = 784, 10

    def __init__(self, root: str = "data", download: bool = True, shuffle: bool = True,
                 batch_size: int = 512, eval_batch_size: int = 2000, train_subset: int | None = None,
                 test_subset: int | None = None, seed: int = 0, num_workers: int = 0):
        super().__init__()
        _positive_int("batch_size", batch_size)
        _positive_int("eval_batch_size", eval_batch_size)
        _positive_int("train_subset", train_subset, allow_none=True)
        _positive_int("test_subset", test_subset, allow_none=True)
        self.root, self.download, self.shuffle = root, download, shuffle
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.train_subset, self.test_subset = train_subset, test_subset
        self.seed, self.num_workers = seed, num_workers
        self.train_set = self.test_set = None

    def prepare_data(self) -> None:
        from .mnist import ensure_mnist
        ensure_mnist(self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_mnist(self.root, train=True, download=self.download)
        xt, yt = load_mnist(self.root, train=False, download=self.download)
        if self.train_subset:
            x, y = x[: self.train_subset], y[: self.train_subset]
        if self.test_subset:
            xt, yt = xt[: self.test_subset], yt[: self.test_subset]
        self.train_set, self.test_set = TensorDataset(x, y), TensorDataset(xt, yt)

    def probe_batch(self, k: int = 16):
        """A fixed batch of k training inputs, for stability probes."""
        self.setup()
        return self.train_set.tensors[0][:k], self.train_set.tensors[1][:k]

    def train_dataloader(self):
        rank, world = _dist(self)
        bs = _per_device(self.batch_size, world)
        return DataLoader(self.train_set, batch_size=bs,
                          sampler=EpochShuffle(len(self.train_set), self.seed, self.shuffle, rank, world,
                                               self.batch_size, skip=self._skip(bs)),
                          num_workers=self.num_workers)

    def val_dataloader(self):
        rank, world = _dist(self)
        return DataLoader(self.test_set, batch_size=max(self.eval_batch_size // world, 1),
                          sampler=EpochShuffle(len(self.test_set), shuffle=False, rank=rank, world=world,
                                               batch=self.eval_batch_size),
                          num_workers=self.num_workers)

    test_dataloader = val_dataloader


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
        _positive_int("N", N)
        _positive_int("m", m)
        _positive_int("steps_per_epoch", steps_per_epoch)
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
        """The minimum-norm minimiser, eq 3.3: W* = (Y − X) Y⁺ (columns = samples)."""
        X, Y = self.X.T, self.Y.T
        return (Y - X) @ torch.linalg.pinv(Y)

    def loss(self, W: torch.Tensor) -> float:
        """J(W) = (1/m) ‖(I − W)⁻¹ X − Y‖²_F, eq 3.1."""
        X, Y = self.X.T.to(W.dtype), self.Y.T.to(W.dtype)
        R = torch.linalg.solve(torch.eye(self.N, dtype=W.dtype, device=W.device) - W, X.to(W.device))
        return float(((R - Y.to(W.device)) ** 2).sum() / self.m)

    def probe_batch(self, k: int = 16):
        return self.X[:k], self.Y[:k]

    def setup(self, stage: str | None = None) -> None:
        pass

    def _shard(self):
        rank, world = _dist(self)
        _per_device(self.m, world)
        return self.X[rank::world], self.Y[rank::world]

    def train_dataloader(self):
        return DataLoader(_Repeat(self._shard(), self.steps_per_epoch), batch_size=None,
                          sampler=EpochShuffle(self.steps_per_epoch, shuffle=False, skip=self._skip(1)))

    def val_dataloader(self):
        return DataLoader(_Repeat(self._shard(), 1), batch_size=None)

    test_dataloader = val_dataloader
