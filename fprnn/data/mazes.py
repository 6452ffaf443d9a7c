"""Mazes: depth-first-search mazes as pixel maps, and their shortest path, for a fully
convolutional fixed-point network (``data=mazes``, ``experiment=mazes``).

A maze of c cells per side is a (2c+1)×(2c+1) grid: cell (i, j) is pixel (2i+1, 2j+1), the pixel
between two adjacent cells is open iff they are joined, the border is closed. Depth-first search
(recursive backtracking) joins every cell to the tree exactly once, so there is exactly one path
between any two cells. Start and goal are two distinct cells drawn at random; the input has three
channels (open, start, goal), the target marks the path's pixels (start and goal included).

Maze k of a split is drawn by a generator seeded with (seed, split, c, k) alone, as trials are
([`fprnn.data.trials`][fprnn.data.trials]): validation and test mazes are the same in every run with one seed, and a
resumed run draws the training mazes it had not seen.

How a trained network does on them: [`fprnn.analysis.mazes`][fprnn.analysis.mazes]; on mazes from a file,
``python -m fprnn.mazes`` ([`fprnn.tools.mazes`][fprnn.tools.mazes]).
"""
from __future__ import annotations


import numpy as np
import torch
from torch.utils.data import DataLoader

from fprnn.core.checks import number, positive_int
from fprnn.data.datamodules import ResumableData, dist_info, per_device
from fprnn.data.trials import SPLITS, EpochTrials, TrialSet

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


def carve_kruskal(cells: int, rng: np.random.Generator) -> np.ndarray:
    """The open pixels of a randomized-Kruskal maze of c cells per side: the walls between adjacent
    cells in random order, each opened when it joins two cells not yet connected (a union–find). A
    spanning tree as depth-first search's, with many short dead ends where that one has long
    corridors: mazes from a generator that training never saw."""
    if isinstance(cells, bool) or not isinstance(cells, (int, np.integer)) or cells < 2:
        raise ValueError(f"a maze needs at least 2 cells per side, got {cells!r}")
    side = 2 * cells + 1
    open_ = np.zeros((side, side), dtype=bool)
    open_[1::2, 1::2] = True
    root = np.arange(cells * cells)

    def find(a: int) -> int:
        while root[a] != a:
            root[a] = root[root[a]]
            a = int(root[a])
        return a
    walls = [(i, j, i + di, j + dj) for i in range(cells) for j in range(cells) for di, dj in ((0, 1), (1, 0))
             if i + di < cells and j + dj < cells]
    for w in rng.permutation(len(walls)):
        i, j, a, b = walls[w]
        ra, rb = find(i * cells + j), find(a * cells + b)
        if ra != rb:
            root[ra] = rb
            open_[i + a + 1, j + b + 1] = True
    return open_


#: how a maze's open pixels are made: ``dfs`` (training's) or ``kruskal``
GENERATORS = {"dfs": carve, "kruskal": carve_kruskal}


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


def make_maze(cells: int, rng: np.random.Generator, generator: str = "dfs") -> tuple[np.ndarray, np.ndarray]:
    """One maze: inputs (3, H, W) float32 (open, start, goal) and target (H, W) int64 (1 on the path);
    its open pixels from ``generator`` (`GENERATORS`)."""
    if generator not in GENERATORS:
        raise ValueError(f"unknown maze generator {generator!r}; choose one of {sorted(GENERATORS)}")
    open_ = GENERATORS[generator](cells, rng)
    a, b = rng.choice(cells * cells, size=2, replace=False)
    start, goal = (2 * (a // cells) + 1, 2 * (a % cells) + 1), (2 * (b // cells) + 1, 2 * (b % cells) + 1)
    x = np.zeros((3, *open_.shape), dtype=np.float32)
    x[0], x[1][start], x[2][goal] = open_, 1.0, 1.0
    return x, tree_path(open_, start, goal).astype(np.int64)


def draw(seed: int, split: str, cells: int, k: int, generator: str = "dfs") -> tuple[np.ndarray, np.ndarray]:
    """Maze k of ``split`` at ``cells`` per side (see the module docstring for the seeding), from
    ``generator``."""
    return make_maze(cells, maze_rng(seed, split, cells, k), generator)


def draw_mixed(seed: int, k: int, sizes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Training maze k of a run that trains on several sizes: its size drawn from ``sizes``, the maze
    drawn at that size and laid at a random offset (an even number of pixels, so cells stay at odd
    pixels) in a closed canvas of the largest size. Walls all round a maze are what its border is
    already, so a network sees a smaller maze as it would alone, and every batch has one shape."""
    big = max(sizes)
    rng = maze_rng(seed, "train", big, k)
    c = int(sizes[int(rng.integers(len(sizes)))])
    x, y = make_maze(c, rng)
    side, i, j = 2 * big + 1, 2 * int(rng.integers(big - c + 1)), 2 * int(rng.integers(big - c + 1))
    canvas_x, canvas_y = np.zeros((3, side, side), dtype=x.dtype), np.zeros((side, side), dtype=y.dtype)
    canvas_x[:, i:i + 2 * c + 1, j:j + 2 * c + 1], canvas_y[i:i + 2 * c + 1, j:j + 2 * c + 1] = x, y
    return canvas_x, canvas_y


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
    training (`extrapolate`). ``batch_size`` is the global batch. ``random_starts``: the share of
    training mazes whose solve starts from a random state (uniform in (−1, 1)) instead of rest
    (Anil et al. 2022: a network trained so settles to one fixed point from anywhere); ``progressive``:
    the weight α of the progressive loss, drawn within ``progressive_iters`` iterations
    ([`fprnn.training.objectives.Mazes`][fprnn.training.objectives.Mazes]). ``train_cells``: train on
    mazes of these sizes instead (each maze's drawn at random, laid in a closed canvas of the largest,
    `draw_mixed`); validation and test stay at ``cells``."""

    task = "classification"
    n_in = None
    n_out = 2
    val_on_test = False
    objective = "mazes"

    def __init__(self, cells: int = 4, test_cells=(6, 9, 12), train_mazes: int = 20000, val_mazes: int = 500,
                 test_mazes: int = 1000, test_mazes_large: int = 200, batch_size: int = 32,
                 eval_batch_size: int = 250, seed: int = 0, random_starts: float = 0.0, progressive: float = 0.0,
                 progressive_iters: int = 30, train_cells=None):
        super().__init__()
        self.cells = _cells("cells", cells)
        if train_cells is not None and (isinstance(train_cells, (int, str)) or not train_cells):
            raise ValueError(f"train_cells must be a non-empty list of cell counts (or null: cells), got {train_cells!r}")
        self.train_cells = None if train_cells is None else [_cells("train_cells", c) for c in train_cells]
        self.random_starts = number("random_starts", random_starts)
        if self.random_starts > 1:
            raise ValueError(f"random_starts must be a share of the training mazes in [0, 1], got {random_starts!r}")
        self.progressive = number("progressive", progressive)
        if self.progressive > 1:
            raise ValueError(f"progressive must be the progressive loss's weight α in [0, 1], got {progressive!r}")
        self.progressive_iters = positive_int("progressive_iters", progressive_iters)
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
        if self.train_cells is None:
            train = TrialSet(lambda sp, k: draw(self.seed, sp, self.cells, k), n, "train", keep=False)
        else:
            train = TrialSet(lambda sp, k: draw_mixed(self.seed, k, self.train_cells), n, "train", keep=False)
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
