"""Mazes in a plain PyTorch loop: a MazeNet (conv stem → r* = tanh(K ⋆ r* + x) → per-pixel head)
trained by BPTT through plain iteration from rest, with gradient clipping and a cosine decay.

    python examples/mazes_bptt.py --out runs/mazes_bptt             # 4,000 steps of 32 mazes of 4×4 cells
    python -m fprnn.mazes runs/mazes_bptt mazes.npz                  # the trained net on mazes of your own

Why not train.py: the fixed point a maze needs has gains above 1 (a path crosses the maze at full
strength), and at the start of training plain iteration does not settle there; the training module
leaves unsettled samples out of a step, while BPTT through the iteration learns from them until
they settle (docs/results.md, "Mazes"). Validation mazes pick the network kept; the test mazes
(held out, 4 cells and larger) are read once, at the end. The last line printed is JSON.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fprnn.data.mazes import collate, draw, evaluate
from fprnn.models.maze_net import MazeNet


def mazes(seed: int, split: str, cells: int, start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mazes start … start+n−1 of a split, as data=mazes draws them: inputs (n, 3, H, W), paths (n, H, W)."""
    return collate([(k, draw(seed, split, cells, k)) for k in range(start, start + n)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping (0: off)")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--cells", type=int, default=4, help="the training mazes' cells per side")
    ap.add_argument("--test-cells", type=int, nargs="+", default=[4, 6, 8, 12])
    ap.add_argument("--val-mazes", type=int, default=256)
    ap.add_argument("--test-mazes", type=int, default=200, help="per size (1,000 at the training size)")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write model.json and weights.pt of the kept network")
    a = ap.parse_args(argv)

    net = MazeNet(channels=a.channels, head_channels=a.channels, rule="bptt", sigma_W=1.0, max_norm=None,
                  solver="iterate", solver_kwargs={"max_iter": 200, "tol": 1e-4}, fallback=None,
                  iters_per_side=16, seed=a.seed)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps)))
    xv, yv = mazes(a.seed, "val", a.cells, 0, a.val_mazes)
    best, kept, t0 = -1.0, None, time.perf_counter()
    for step in range(a.steps):
        net.train()
        x, y = mazes(a.seed, "train", a.cells, step * a.batch, a.batch)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()            # K.grad: autograd through the unrolled steps (rule="bptt")
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), a.clip)
        opt.step()
        sched.step()
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            with torch.no_grad():
                val = evaluate(net, xv, yv)
            print(f"step {step + 1}: loss {loss.item():.3f}, validation whole-maze {val['maze_acc']:.3f}, "
                  f"pixels {val['pixel_acc']:.4f}, {val['iterations']:.0f} iterations, "
                  f"{val['unconverged']} unconverged ({time.perf_counter() - t0:.0f} s)", flush=True)
            if val["maze_acc"] >= best:
                best, kept = val["maze_acc"], {k: v.clone() for k, v in net.state_dict().items()}
                kept_step = step + 1
    net.load_state_dict(kept)
    result = {"kept_step": kept_step, "val_maze_acc": best, "wall_s": round(time.perf_counter() - t0, 1), "test": {}}
    with torch.no_grad():
        for cells in a.test_cells:
            n = a.test_mazes * (5 if cells == a.cells else 1)
            r = evaluate(net, *mazes(a.seed, "test", cells, 0, n))
            result["test"][cells] = {k: round(v, 4) if isinstance(v, float) else v
                                     for k, v in r.items() if k != "fixed_points"} | {"mazes": n}
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "model.json").write_text(json.dumps(net.config, indent=2))
        torch.save(net.state_dict(), a.out / "weights.pt")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
