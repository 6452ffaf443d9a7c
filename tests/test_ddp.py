"""Multi-device training (2 CPU processes, gloo): the hand-computed ΔW is synchronized exactly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fprnn.run import train

from helpers import make_cfg

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20


def common(mnist_dir):
    return ["progress_bar=false", "logger=csv", "model.dtype=float64", "solver.kwargs.tol=1e-12",
            "data.shuffle=false", "data.train_subset=1280", "data.batch_size=64", "data.test_subset=200",
            f"data.root={mnist_dir}", "data.download=false", f"trainer.max_steps={STEPS}",
            "trainer.limit_val_batches=0", "module.check_every=5"]


def run_ddp(overrides, run_dir, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *overrides,
                           f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


CASES = {
    "w1": ["rule=w1", "lr=0.02"],
    "w2": ["rule=w2", "lr=0.25"],
    "w3": ["rule=w3", "lr=0.25"],
    "w4": ["rule=w4", "lr=0.05"],
    "bptt": ["rule=bptt", "lr=0.05", "model.bptt_steps=20"],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_two_devices_equal_one_device(tmp_path, mnist_dir, name):
    over = [*common(mnist_dir), *CASES[name]]
    one = train(make_cfg(over, tmp_path / "one"))
    run_ddp(over, tmp_path / "two")
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert one["steps"] == two["steps"] == STEPS and two["status"] == "finished"
    W1 = torch.load(tmp_path / "one" / "weights.pt")["W"]
    W2 = torch.load(tmp_path / "two" / "weights.pt")["W"]
    assert float((W2 - W1).norm() / W1.norm()) < 1e-6
    assert not any(p.name.startswith("2") for p in (tmp_path / "two").iterdir())  # one run dir


def test_linear_w2_batch_form_is_exact_under_ddp(tmp_path):
    """eq 3.8 is not a mean of per-device updates: the factors are gathered instead."""
    over = ["experiment=paper_linear", "rule=w2", "lr=1", "progress_bar=false", "logger=csv",
            "trainer.max_steps=20", "trainer.limit_val_batches=0"]
    train(make_cfg(over, tmp_path / "one"))
    run_ddp(over, tmp_path / "two")
    W1 = torch.load(tmp_path / "one" / "weights.pt")["W"]
    W2 = torch.load(tmp_path / "two" / "weights.pt")["W"]
    W0 = torch.load(tmp_path / "one" / "weights.pt")["W"] * 0
    assert float((W2 - W1).norm() / W1.norm()) < 1e-10 and not torch.equal(W1, W0)


def test_rank_agreement_check_fires(tmp_path, mnist_dir):
    over = [*common(mnist_dir), "rule=w3", "+callbacks.perturb._target_=ddp_callbacks.PerturbRank",
            "+callbacks.perturb.rank=1", "+callbacks.perturb.step=3"]
    proc = run_ddp(over, tmp_path / "bad", check=False)
    assert proc.returncode != 0
    assert "ranks disagree on W after step 5" in proc.stderr
    saved = json.loads((tmp_path / "bad" / "results.json").read_text())
    assert saved["status"] == "failed" and "ranks disagree" in saved["error"]
