"""A trained maze run on mazes from a file (any size, any generator):

    python -m fprnn.mazes RUN_DIR FILE.npz

reads ``inputs`` (n, 3, H, W) and ``targets`` (n, H, W) and prints, last, one JSON line with
``maze_acc`` (every pixel right) and ``pixel_acc``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from fprnn.analysis.mazes import evaluate, public

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
    out = public(evaluate(net, x, y, batch=args.batch))
    out.update(mazes=len(x), height=int(x.shape[2]), width=int(x.shape[3]))
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
