"""What a run tells its user (fprnn.training.console): the summary as fprnn's last output, and none of the
third-party lines a user cannot act on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fprnn.training.run import train

from helpers import QUICK_MNIST, make_cfg

ROOT = Path(__file__).resolve().parents[1]
NOISE = ["weights_only` was not set", "💡 Tip", "was configured so 100% of the batches", "LeafSpec",
         "anonymous setting has no effect"]


def run(tmp_path, mnist_dir, *extra):
    cmd = [sys.executable, str(ROOT / "train.py"), "experiment=paper_mnist", f"data.root={mnist_dir}",
           "data.download=false", "data.train_subset=1024", "data.test_subset=500", "progress_bar=false",
           f"hydra.run.dir={tmp_path}", *extra]
    # as a user's shell has it: W&B not silenced by CI's WANDB_SILENT, no HYDRA_FULL_ERROR
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "HYDRA_FULL_ERROR")}
    env["WANDB_MODE"] = "offline"
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_a_run_ends_with_its_summary_and_without_noise(tmp_path, mnist_dir):
    proc = run(tmp_path, mnist_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "results.json").read_text())
    tail = proc.stdout.strip().splitlines()[-4:]
    assert tail[0].startswith("fprnn: finished in ")
    assert tail[1] == f"  test acc {res['test_acc']:.4g} (the last network, after 3 epochs)"
    assert tail[2].startswith(f"  faults 0 of {res['attempted_steps']} attempted steps · unconverged samples left "
                              f"out 0 · peak stability {res['peak_max_re_eig']:.4g}")
    assert tail[3] == f"  run dir {tmp_path} (results.json)"
    everything = proc.stdout + proc.stderr
    assert not [n for n in NOISE if n in everything], [n for n in NOISE if n in everything]
    assert "fprnn: finished in " in (tmp_path / "train.log").read_text()       # Hydra's log keeps it
    # verbose=true leaves everything on
    loud = run(tmp_path / "loud", mnist_dir, "verbose=true", "trainer.max_steps=1", "logger=csv")
    assert "💡 Tip" in loud.stdout + loud.stderr


def test_best_network_and_faults_in_the_summary():
    from fprnn.training.console import summary
    lines = summary({"status": "diverged", "wall_s": 12.3, "weights": "best", "test_acc": 0.91, "last_test_acc": 0.5,
                     "best_epoch": 1, "epochs": 4, "attempted_steps": 40, "faults": 10, "unconverged": 7,
                     "peak_max_re_eig": 1.4, "fault_log": [f"step {k}: non-finite loss" for k in range(10)],
                     "run_dir": "/x/y"})
    assert lines == ["fprnn: diverged in 12 s",
                     "  test acc 0.91 (the best validation network, epoch 2 of 4); the last network 0.5",
                     "  faults 10 of 40 attempted steps · unconverged samples left out 7 · peak stability 1.4 (< 1 stable)",
                     "    step 7: non-finite loss", "    step 8: non-finite loss", "    step 9: non-finite loss",
                     "  run dir /x/y (results.json)"]


def test_a_paper_mnist_run_loads_no_checkpoint(tmp_path, mnist_dir, monkeypatch):
    """The paper's protocol keeps the last network: nothing is loaded back. Saves: last.ckpt every
    50 steps and at each epoch end."""
    loads, real = [], torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: (loads.append(str(f)), real(f, *a, **k))[1])
    res = train(make_cfg([*QUICK_MNIST, "experiment=paper_mnist", "trainer.max_epochs=2", "ckpt.every_n_steps=3",
                          "data.batch_size=128"], tmp_path, mnist_dir))
    assert res["status"] == "finished" and res["steps"] == 16
    assert [f for f in loads if f.endswith(".ckpt")] == []


def test_a_multirun_ends_with_one_line_per_point(tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py"), "--multirun", "experiment=paper_linear", "rule=w1,w3",
           "trainer.max_steps=5", "logger=csv", "progress_bar=false", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    J = {d: json.loads((tmp_path / d / "results.json").read_text())["loss_W"] for d in ("0_w1_lr0.25", "1_w3_lr0.25")}
    expect = [f"fprnn: sweep {tmp_path}", f"  0_w1_lr0.25: finished, J(W) {J['0_w1_lr0.25']:.4g}",
              f"  1_w3_lr0.25: finished, J(W) {J['1_w3_lr0.25']:.4g}"]
    assert proc.stdout.strip().splitlines()[-4:] == [*expect, f"  summary: {tmp_path / 'summary.txt'}"]
    assert (tmp_path / "summary.txt").read_text().splitlines() == expect
