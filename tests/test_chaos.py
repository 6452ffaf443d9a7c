"""A run killed with SIGKILL — no handler runs — and resumed with resume=true, any number of times,
ends with the uninterrupted run's W and loses at most ckpt.every_n_steps steps per kill.

The suite kills twice (after a random step, and halfway through a checkpoint write);
FPRNN_CHAOS_KILLS=5 pytest tests/test_chaos.py kills five times."""
import os
import random
import subprocess
import sys
from pathlib import Path

import torch

from fprnn.training.run import train

from helpers import loss_rows, make_cfg

ROOT = Path(__file__).resolve().parents[1]
EVERY = 3
STEPS = 24      # 3 epochs of 8 batches


def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_W(tmp_path, mnist_dir):
    over = ["progress_bar=false", "logger=csv", "data.train_subset=1024", "data.test_subset=500",
            "data.batch_size=128", "trainer.max_epochs=3", "model.dtype=float64", "solver.kwargs.tol=1e-12",
            "rule=w3", "lr=0.25", f"data.root={mnist_dir}", "data.download=false",
            "callbacks.stability.every_n_steps=4", f"ckpt.every_n_steps={EVERY}"]
    ref = train(make_cfg(over, tmp_path / "ref"))
    assert ref["steps"] == STEPS
    kills = int(os.environ.get("FPRNN_CHAOS_KILLS", "2"))
    rng = random.Random(int(os.environ.get("FPRNN_CHAOS_SEED", "0")))
    steps = sorted(rng.sample(range(2, STEPS - 1), kills))
    write_kill = rng.randrange(kills)         # this kill hits a checkpoint write
    run_dir = tmp_path / "chaos"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), WANDB_MODE="offline")
    saved = 0
    for i, step in enumerate(steps):
        cut = ["+callbacks.kill._target_=ddp_callbacks.KillAt", f"+callbacks.kill.step={step}",
               f"+callbacks.kill.during_write={i == write_kill}"]
        proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *over, f"hydra.run.dir={run_dir}",
                               "resume=true", *cut], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == -9, proc.stderr[-2000:]
        if i == write_kill:   # the half-written file is the temporary one; last.ckpt is the previous
            assert (run_dir / "checkpoints" / "last.ckpt.tmp").exists()
        last = run_dir / "checkpoints" / "last.ckpt"      # none yet if killed before the first save
        at = torch.load(last, weights_only=False)["global_step"] if last.exists() else 0   # whole, readable
        print(f"kill {i + 1} after step {step}{' in a checkpoint write' if i == write_kill else ''}: "
              f"resumes from step {at}")
        # killed after `step` (or, mid-write, before the save that `step` triggered): work lost
        done = step if i != write_kill else -(-step // EVERY) * EVERY
        assert saved <= at and done - at <= EVERY, (step, at)
        saved = at
    resumed = train(make_cfg([*over, "resume=true"], run_dir))
    assert resumed["status"] == "finished" and resumed["steps"] == STEPS
    W_ref = torch.load(tmp_path / "ref" / "weights.pt")["layers.0.W"]
    W_res = torch.load(run_dir / "weights.pt")["layers.0.W"]
    assert float((W_res - W_ref).abs().max()) <= 1e-12 * float(W_ref.abs().max())
    # the training curve survives the kills: the same rows as the uninterrupted run's
    assert loss_rows(run_dir) == loss_rows(tmp_path / "ref") and len(loss_rows(run_dir)) == STEPS

