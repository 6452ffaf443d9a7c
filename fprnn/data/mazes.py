"""Mazes: depth-first-search mazes as pixel maps, and their shortest path, for a fully
convolutional fixed-point network (``data=mazes``, ``experiment=mazes``).

A maze of c cells per side is a (2c+1)×(2c+1) grid: cell (i, j) is pixel (2i+1, 2j+1), the pixel
between two adjacent cells is open iff they are joined, the border is closed. Depth-first search
(recursive backtracking) joins every cell to the tree exactly once, so there is exactly one path
between any two cells. Start and goal are two distinct cells drawn at random; the input has three
channels (open, start, goal), the target marks the path's pixels (start and goal included).

Maze k of a split is drawn by a generator seeded with (seed, split, c, k) alone, as trials are
([`fprnn.data.tasks`][fprnn.data.tasks]): validation and test mazes are the same in every run with one seed, and a
resumed run draws the training mazes it had not seen.

    python -m fprnn.mazes RUN_DIR FILE.npz     # a trained run on mazes from a file (any size)

reads ``inputs`` (n, 3, H, W) and ``targets`` (n, H, W) and prints, last, one JSON line with
``maze_acc`` (every pixel right) and ``pixel_acc``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from fprnn.core.checks import positive_int
from fprnn.data.datamodules import ResumableData, dist_info, per_device
from fprnn.data.tasks import SPLITS, EpochTrials, TrialSet

Tensor = torch.Tensor
_STEPS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def maze_rng(seed: int, split: str, cells: int, k: int) -> np.random.Generator:
    """The generator of maze k of ``split`` at ``cells`` per side: seeded by these alone."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(cells), int(k)]))


def carve(cells: int, rng: np.random.Generator) -> np.ndarray:
    """The open pixels (bool, (2c+1)×(2c+1)) of a depth-first-search maze of c cells per side:
    from a random cell, walk to a random unvisited neighbour, opening the wall between, and back
    up when there is none."""
    if isinstance(cells, bool) or not isinstance(cells, (int, np.integer)) or cells < 2:
        raise ValueError(f"a maze needs at least 2 cells per side, got {cells!r}")
    side = 2 * cells + 1
    open_ = np.zeros((side, side), dtype=bool)
    seen = np.zeros((cells, cells), dtype=bool)
    start = (int(rng.integers(cells)), int(rng.integers(cells)))
    stack, seen[start] = [start], True
    open_[2 * start[0] + 1, 2 * start[1] + 1] = True
    while stack:
        i, j = stack[-1]
        nxt = [(i + di, j + dj) for di, dj in _STEPS
               if 0 <= i + di < cells and 0 <= j + dj < cells and not seen[i + di, j + dj]]
        if not nxt:
            stack.pop()
            continue
        a, b = nxt[int(rng.integers(len(nxt)))]
        seen[a, b] = True
        open_[2 * a + 1, 2 * b + 1] = True
        open_[i + a + 1, j + b + 1] = True      # the wall pixel between (i, j) and (a, b)
        stack.append((a, b))
    return open_


def tree_path(open_: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> np.ndarray:
    """The pixels (bool map) of the path from pixel ``start`` to pixel ``goal`` through open
    pixels: a depth-first walk that keeps its parents (in a tree the path is unique)."""
    H, W = open_.shape
    parent = {start: None}
    todo = [start]
    while todo:
        p = todo.pop()
        if p == goal:
            break
        for di, dj in _STEPS:
            q = (p[0] + di, p[1] + dj)
            if 0 <= q[0] < H and 0 <= q[1] < W and open_[q] and q not in parent:
                parent[q] = p
                todo.append(q)
    if goal not in parent:
        raise ValueError(f"no path from {start} to {goal}")
    path = np.zeros_like(open_)
    p = goal
    while p is not None:
        path[p] = True
        p = parent[p]
    return path


def make_maze(cells: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One maze: inputs (3, H, W) float32 (open, start, goal) and target (H, W) int64 (1 on the path)."""
    open_ = carve(cells, rng)
    a, b = rng.choice(cells * cells, size=2, replace=False)
    start, goal = (2 * (a // cells) + 1, 2 * (a % cells) + 1), (2 * (b // cells) + 1, 2 * (b % cells) + 1)
    x = np.zeros((3, *open_.shape), dtype=np.float32)
    x[0], x[1][start], x[2][goal] = open_, 1.0, 1.0
    return x, tree_path(open_, start, goal).astype(np.int64)


def draw(seed: int, split: str, cells: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Maze k of ``split`` at ``cells`` per side (see the module docstring for the seeding)."""
    return make_maze(cells, maze_rng(seed, split, cells, k))


def _cells(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 2:
        raise ValueError(f"{name} must be a number of cells per side ≥ 2, got {v!r}")
    return v


def collate(items) -> tuple[Tensor, Tensor]:
    """(index, (maze, path)) items → inputs (B, 3, H, W) and targets (B, H, W)."""
    return (torch.from_numpy(np.stack([x for _, (x, _) in items])),
            torch.from_numpy(np.stack([y for _, (_, y) in items])))


class MazeDataModule(ResumableData):
    """Mazes of ``cells`` per side: ``train_mazes`` fresh ones every epoch (epoch e draws mazes
    e·n … e·n + n − 1 of the training stream), ``val_mazes`` and ``test_mazes`` drawn once;
    ``test_cells``: the larger sizes tested without retraining (``test_mazes_large`` each), after
    training (`extrapolate`). ``batch_size`` is the global batch."""

    task = "classification"
    n_in = None
    n_out = 2
    val_on_test = False

    def __init__(self, cells: int = 4, test_cells=(6, 9, 12), train_mazes: int = 20000, val_mazes: int = 500,
                 test_mazes: int = 1000, test_mazes_large: int = 200, batch_size: int = 32,
                 eval_batch_size: int = 250, seed: int = 0):
        super().__init__()
        self.cells = _cells("cells", cells)
        if isinstance(test_cells, (int, str)) or not all(isinstance(c, int) for c in (test_cells or [])):
            raise ValueError(f"test_cells must be a list of cell counts, got {test_cells!r}")
        self.test_cells = [_cells("test_cells", c) for c in test_cells or []]
        for name, v in (("train_mazes", train_mazes), ("val_mazes", val_mazes), ("test_mazes", test_mazes),
                        ("test_mazes_large", test_mazes_large), ("batch_size", batch_size),
                        ("eval_batch_size", eval_batch_size)):
            positive_int(name, v)
        if train_mazes < batch_size:
            raise ValueError(f"train_mazes={train_mazes} is less than one batch (batch_size={batch_size})")
        self.train_mazes, self.val_mazes, self.test_mazes = train_mazes, val_mazes, test_mazes
        self.test_mazes_large, self.batch_size, self.eval_batch_size = test_mazes_large, batch_size, eval_batch_size
        self.seed = int(seed)
        self.val_set = self.test_set = None

    @property
    def val_size(self) -> int:
        return self.val_mazes

    @property
    def validation(self) -> str:
        return f"{self.val_mazes} held-out mazes of {self.cells} cells (seed {self.seed})"

    def mazes(self, split: str, cells: int | None = None, n: int | None = None) -> TrialSet:
        """The first n mazes of ``split`` at ``cells`` per side, kept."""
        c = self.cells if cells is None else cells
        return TrialSet(lambda sp, k: draw(self.seed, sp, c, k), n, split, keep=True)

    def setup(self, stage: str | None = None) -> None:
        if self.val_set is None:
            self.val_set = self.mazes("val", n=self.val_mazes)
            self.test_set = self.mazes("test", n=self.test_mazes)

    def train_dataloader(self):
        rank, world = dist_info(self)
        per = per_device(self.batch_size, world)
        n = (self.train_mazes // self.batch_size) * self.batch_size
        train = TrialSet(lambda sp, k: draw(self.seed, sp, self.cells, k), n, "train", keep=False)
        return DataLoader(train, batch_size=per, sampler=EpochTrials(n, self.batch_size, rank, world, self._skip(per)),
                          collate_fn=collate)

    def loader(self, ds) -> DataLoader:
        return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, collate_fn=collate)

    def val_dataloader(self):
        return self.loader(self.val_set)

    def test_dataloader(self):
        return self.loader(self.test_set)

    def probe_batch(self, k: int = 16) -> tuple[Tensor, Tensor]:
        """The first k validation mazes."""
        self.setup()
        return collate([self.val_set[i] for i in range(min(k, len(self.val_set)))])


#: iteration budgets of the accuracy-against-settling curve (iterations of the solver from rest)
BUDGETS = (1, 2, 5, 10, 20, 50, 100, 200, 400)


@torch.no_grad()
def evaluate(net, x: Tensor, y: Tensor, batch: int = 250, u0: str = "rest", seed: int = 0) -> dict:
    """``net``'s answers on mazes x (n, 3, H, W) with paths y (n, H, W): ``maze_acc`` (every pixel
    right), ``pixel_acc``, the solver's mean ``iterations`` and the ``unconverged`` count, solved from
    ``u0`` = ``rest`` or ``random`` (uniform in (−1, 1), seeded); with ``fixed_points`` the rows."""
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    right = pixels = iters = unconverged = 0
    rows = []
    for i in range(0, len(x), batch):
        xb, yb = x[i:i + batch], y[i:i + batch]
        start = None
        if u0 == "random":
            start = torch.rand(len(xb), net.layer.channels, *xb.shape[2:], generator=gen, dtype=net.dtype) * 2 - 1
        pred = net(xb, start).argmax(1)
        ok = pred == yb.to(pred.device)
        right += int(ok.flatten(1).all(1).sum())
        pixels += int(ok.sum())
        sol = net.layer.report.fixed_point.solution
        iters += float(sol.iters.float().sum())
        unconverged += int(sol.n_nonconverged)
        rows.append(net.layer.report.fixed_point.r)
    n = len(x)
    return {"maze_acc": right / n, "pixel_acc": pixels / y.numel(), "iterations": iters / n,
            "unconverged": unconverged, "fixed_points": torch.cat(rows)}


def _public(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "fixed_points"}


@torch.no_grad()
def budget_curve(net, x: Tensor, y: Tensor, budgets=BUDGETS) -> dict:
    """Maze accuracy when the solver from rest stops after each budget of iterations (no fallback):
    does more settling solve larger mazes?"""
    layer = net.layer
    saved = dict(layer.solver_kwargs), layer.iters_per_side, layer.fallback
    try:
        layer.iters_per_side, layer.fallback = None, None
        out = {}
        for b in budgets:
            layer.solver_kwargs = {**saved[0], "max_iter": int(b)}
            out[int(b)] = evaluate(net, x, y)["maze_acc"]
        return out
    finally:
        layer.solver_kwargs, layer.iters_per_side, layer.fallback = saved


def stacked(ds) -> tuple[Tensor, Tensor]:
    return collate([ds[i] for i in range(len(ds))])


def maze_report(net, data: MazeDataModule, run_dir: Path | None = None, log=print) -> dict:
    """After training: the test mazes of the training size and of every ``test_cells`` size —
    accuracy, solver iterations, the accuracy-against-budget curve, and path independence (the fixed
    points and answers from random starts against those from rest) — and a figure."""
    out: dict = {"extrapolation": {}, "budget_curve": {}, "path_independence": {}}
    sizes = [data.cells, *data.test_cells]
    shown = {}
    for c in sizes:
        t0 = time.perf_counter()
        n = data.test_mazes if c == data.cells else data.test_mazes_large
        x, y = stacked(data.mazes("test", c, n))
        rest = evaluate(net, x, y)
        rand = evaluate(net, x, y, u0="random")
        gap = (rest["fixed_points"] - rand["fixed_points"]).abs().amax(1)
        out["extrapolation"][c] = {**_public(rest), "side": 2 * c + 1, "mazes": n}
        out[f"maze_acc_{c}"] = rest["maze_acc"]       # flat, for the sweep's table
        out["path_independence"][c] = {"maze_acc_from_random": rand["maze_acc"],
                                       "max_state_gap": float(gap.max()),
                                       "same_fixed_point": float((gap < 1e-3).float().mean())}
        out["budget_curve"][c] = budget_curve(net, x[:200], y[:200])
        shown[c] = (x[:3], y[:3])
        log(f"mazes of {c} cells ({2 * c + 1}×{2 * c + 1}): maze acc {rest['maze_acc']:.3f}, pixel acc "
            f"{rest['pixel_acc']:.4f}, {rest['iterations']:.0f} iterations; from random starts "
            f"{rand['maze_acc']:.3f} (largest state gap {float(gap.max()):.2g}) [{time.perf_counter() - t0:.0f} s]")
    if run_dir is not None:
        out["maze_figure"] = str(figure(net, shown, Path(run_dir) / "mazes.png"))
    return out


@torch.no_grad()
def figure(net, shown: dict, path: Path, channels: int = 3) -> Path:
    """Mazes (open pixels grey, start green, goal red), their path, the prediction and the
    ``channels`` channels of the fixed point r∗ that vary most across the maze's pixels (a saturated
    channel is one colour and shows nothing), a row per maze, for each size in ``shown``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [(c, x[i:i + 1], y[i]) for c, (x, y) in shown.items() for i in range(len(x))]
    cols = 3 + channels
    fig, axes = plt.subplots(len(rows), cols, figsize=(2 * cols, 2 * len(rows)), squeeze=False)
    for ax_row, (c, x, y) in zip(axes, rows):
        pred = net(x).argmax(1)[0]
        r = net.layer.maps(net.layer.report.fixed_point.r, tuple(x.shape[2:]))[0]
        img = np.stack([x[0, 0] * 0.6 + x[0, 2] * 0.4, x[0, 0] * 0.6 + x[0, 1] * 0.4, x[0, 0] * 0.6], -1)
        panels = [(img, None, f"{c} cells"), (y, "gray", "path"),
                  (pred, "gray", "prediction" + (" ✓" if bool((pred == y).all()) else " ✗"))]
        varied = r.flatten(1).var(1).argsort(descending=True)[:channels].tolist()
        panels += [(r[k], "RdBu_r", f"r∗ channel {k}") for k in varied]
        for ax, (a, cmap, title) in zip(ax_row, panels):
            ax.imshow(np.asarray(a, dtype=float), cmap=cmap, vmin=None if cmap != "RdBu_r" else -1,
                      vmax=None if cmap != "RdBu_r" else 1, interpolation="nearest")
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def read_mazes(path: Path) -> tuple[Tensor, Tensor]:
    """``inputs`` (n, 3, H, W) (open, start, goal; any numbers, read as floats) and ``targets``
    (n, H, W) (0/1 or bool: 1 on the path) from an .npz file; every bad key named with its shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with np.load(path, allow_pickle=False) as f:
        missing = [k for k in ("inputs", "targets") if k not in f.files]
        if missing:
            raise ValueError(f"{path}: missing key(s) {missing}; a mazes file has inputs (n, 3, H, W) and targets "
                             f"(n, H, W), found {sorted(f.files)}")
        x, y = f["inputs"], f["targets"]
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"{path}: inputs has shape {x.shape}; expected (n, 3, H, W) with n ≥ 1 (open, start, goal)")
    if y.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"{path}: targets has shape {y.shape}; expected (n, H, W) = {(x.shape[0], *x.shape[2:])}")
    if not np.issubdtype(x.dtype, np.number) and x.dtype != bool or not np.isfinite(x.astype(np.float64)).all():
        raise ValueError(f"{path}: inputs must be finite numbers, got dtype {x.dtype}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"{path}: targets must be 0 or 1 (1 on the path), got values {np.unique(y)[:6].tolist()}")
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


def main(argv=None) -> dict:
    from fprnn.models.maze_net import MazeNet
    parser = argparse.ArgumentParser(prog="python -m fprnn.mazes", description="A trained maze run on mazes from "
                                     "a file; the last line printed is JSON with maze_acc and pixel_acc.")
    parser.add_argument("run_dir", type=Path, help="a run directory of experiment=mazes (model.json, weights.pt)")
    parser.add_argument("file", type=Path, help=".npz with inputs (n, 3, H, W) and targets (n, H, W)")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args(argv)
    try:
        net = MazeNet.load(args.run_dir)
        x, y = read_mazes(args.file)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(f"{len(x)} mazes of {x.shape[2]}×{x.shape[3]} pixels from {args.file}", flush=True)
    out = _public(evaluate(net, x, y, batch=args.batch))
    out.update(mazes=len(x), height=int(x.shape[2]), width=int(x.shape[3]))
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
