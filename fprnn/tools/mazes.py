"""A trained maze run on mazes from a file (any size, any generator):

    python -m fprnn.mazes RUN_DIR FILE.npz

reads ``inputs`` (n, 3, H, W) and ``targets`` (n, H, W) and prints, last, one JSON line with
``maze_acc`` (every pixel right) and ``pixel_acc``. On larger mazes it draws, by settling longer:

    python -m fprnn.mazes RUN_DIR --cells 16 32 64 --mazes 100 --generator kruskal

prints a table — at each size and budget (iterations a pixel of the side, ``--iters-per-side``),
the whole-maze accuracy, the share settled and the seconds a maze took — and, last, one JSON line
of it; ``--out DIR`` also writes it (large_mazes.json) and its figure (large_mazes.png). With
``--solver anderson`` (another of the solvers than the network's own) the mazes are solved by it,
and at the largest budget its fixed points are checked against the network's own solver's (the JSON
is then {"curves": …, "same_fixed_point": {cells: …}}, `fprnn.analysis.mazes.same_fixed_point`)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from fprnn.analysis.mazes import curve_figure, evaluate, public, same_fixed_point, settling_curve
from fprnn.core.solvers import SOLVERS
from fprnn.data.mazes import GENERATORS, collate, draw

Tensor = torch.Tensor


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


def large_mazes(net, cells, n: int, generator: str, seed: int, iters_per_side, batch: int = 100,
                log=print, method: str | None = None) -> dict:
    """{cells: {iterations: settling_curve point}} on n mazes of each size from ``generator``
    (test split, ``seed``), with budgets of each of ``iters_per_side`` iterations a pixel of the side,
    ``batch`` mazes solved at a time by the layer's solver, or by ``method`` — and then also
    {"curves": that, "same_fixed_point": {cells: its agreement with the layer's own solver at the
    largest budget}}."""
    curves, agreement = {}, {}
    for c in cells:
        x, y = collate([(k, draw(seed, "test", c, k, generator)) for k in range(n)])
        side = 2 * c + 1
        budgets = [math.ceil(k * side) for k in iters_per_side]
        curves[c] = settling_curve(net, x, y, budgets, batch=batch, method=method)
        for its, point in curves[c].items():
            log(f"| {c} | {side} | {its} | {point['maze_acc']:.3f} | {point['settled']:.3f} | "
                f"{point['seconds_per_maze']:.3f} |")
        if method is not None:
            agreement[c] = same_fixed_point(net, x, method, max(budgets), batch=batch)
            log(f"{c} cells, {max(budgets)} iterations: both solvers settled {agreement[c]['both_settled']:.3f} of "
                f"the mazes; of those, the same fixed point {agreement[c]['same_state']:.3f}, the same answer "
                f"{agreement[c]['same_answer']:.3f}")
    return curves if method is None else {"curves": curves, "same_fixed_point": agreement}


def main(argv=None) -> dict:
    from fprnn.models.maze_net import MazeNet
    parser = argparse.ArgumentParser(prog="python -m fprnn.mazes", description="A trained maze run on mazes from "
                                     "a file, or on larger mazes it draws (--cells); the last line printed is JSON.")
    parser.add_argument("run_dir", type=Path, help="a run directory of experiment=mazes (model.json, weights.pt)")
    parser.add_argument("file", type=Path, nargs="?", help=".npz with inputs (n, 3, H, W) and targets (n, H, W)")
    parser.add_argument("--batch", type=int, default=100, help="mazes solved at a time")
    parser.add_argument("--cells", type=int, nargs="+", help="draw mazes of these cells per side instead of a file")
    parser.add_argument("--mazes", type=int, default=100, help="mazes of each size (--cells)")
    parser.add_argument("--generator", default="dfs", help=f"how drawn mazes are made: {sorted(GENERATORS)}")
    parser.add_argument("--seed", type=int, default=0, help="the drawn mazes' seed (test split)")
    parser.add_argument("--iters-per-side", type=positive_float_list, default=[1, 2, 4, 8, 16],
                        help="budgets, in iterations a pixel of the side (comma-separated)")
    parser.add_argument("--solver", help=f"solve the drawn mazes with this solver ({sorted(SOLVERS)}) and check "
                        "its fixed points against the network's own solver's")
    parser.add_argument("--out", type=Path, help="write large_mazes.json and large_mazes.png here")
    args = parser.parse_args(argv)
    try:
        if (args.file is None) == (args.cells is None):
            raise ValueError("give a mazes file or --cells (not both)")
        if args.batch < 1:
            raise ValueError(f"--batch must be ≥ 1, got {args.batch}")
        if args.cells is not None:
            for c in args.cells:
                if c < 2:
                    raise ValueError(f"--cells must be cells per side ≥ 2, got {c}")
            if args.mazes < 1:
                raise ValueError(f"--mazes must be ≥ 1, got {args.mazes}")
            if args.generator not in GENERATORS:
                raise ValueError(f"unknown --generator {args.generator!r}; choose one of {sorted(GENERATORS)}")
            if args.solver is not None and args.solver not in SOLVERS:
                raise ValueError(f"unknown --solver {args.solver!r}; choose one of {sorted(SOLVERS)}")
        net = MazeNet.load(args.run_dir)
        x, y = (None, None) if args.file is None else read_mazes(args.file)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if args.cells is not None:
        print(f"{args.mazes} {args.generator} mazes a size (seed {args.seed}), solved from rest\n"
              f"| cells | side (px) | iterations | whole-maze acc | settled | s a maze |\n| --- | --- | --- | --- | --- | --- |",
              flush=True)
        result = large_mazes(net, args.cells, args.mazes, args.generator, args.seed, args.iters_per_side,
                             batch=args.batch, log=lambda line: print(line, flush=True), method=args.solver)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "large_mazes.json").write_text(json.dumps(result, indent=1))
            curve_figure(result if args.solver is None else result["curves"], args.out / "large_mazes.png")
        print(json.dumps(result), flush=True)
        return result
    print(f"{len(x)} mazes of {x.shape[2]}×{x.shape[3]} pixels from {args.file}", flush=True)
    out = public(evaluate(net, x, y, batch=args.batch))
    out.update(mazes=len(x), height=int(x.shape[2]), width=int(x.shape[3]))
    print(json.dumps(out), flush=True)
    return out


def positive_float_list(text: str) -> list[float]:
    """'1,2,4' → [1.0, 2.0, 4.0], each > 0."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


if __name__ == "__main__":
    main()
