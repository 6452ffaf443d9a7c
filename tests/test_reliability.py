"""Bad input, divergence, NaN and interruption: clear errors, recorded results, nothing lost."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fprnn.core import rules

from fprnn.data import vision
from fprnn.data.datamodules import VisionDataModule
from fprnn.training.run import build, train

from helpers import QUICK_MNIST, loss_rows, make_cfg

ROOT = Path(__file__).resolve().parents[1]


# two layers, trained read-in/read-out and biases, Adam and a cosine schedule: every state resumes
STACK = ["model.layers=[40,30]", "model.train_readin=true", "model.train_readout=true",
         "model.bias=true", "optimizer=adam", "scheduler=cosine", "module.readin=gradient"]


@pytest.mark.parametrize("sig,extra", [("SIGINT", []), ("SIGTERM", STACK)], ids=["SIGINT", "SIGTERM-stack"])
def test_interrupt_then_resume_gives_the_uninterrupted_W(tmp_path, mnist_dir, sig, extra):
    over = [*QUICK_MNIST, "model.dtype=float64", "solver.kwargs.tol=1e-12", "rule=w3", "lr=0.25",
            "data.batch_size=128", "trainer.max_epochs=2", f"data.root={mnist_dir}", "data.download=false",
            "callbacks.stability.every_n_steps=3", *extra]
    ref = train(make_cfg(over, tmp_path / "ref"))
    run_dir = tmp_path / "cut"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "tests"), WANDB_MODE="offline")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *over, f"hydra.run.dir={run_dir}",
                           "+callbacks.cut._target_=ddp_callbacks.SignalAt", "+callbacks.cut.step=5",
                           f"+callbacks.cut.sig={sig}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == {"SIGTERM": 143, "SIGINT": 130}[sig], proc.stderr[-2000:]
    cut = json.loads((run_dir / "results.json").read_text())
    assert cut["status"] == "interrupted" and cut["steps"] == 5, cut
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    resumed = train(make_cfg([*over, "resume=true"], run_dir))
    assert resumed["status"] == "finished" and resumed["steps"] == ref["steps"] == 16
    w_ref = torch.load(tmp_path / "ref" / "weights.pt")
    w_res = torch.load(run_dir / "weights.pt")
    assert set(w_res) == set(w_ref) and len(w_ref) == (8 if extra else 3)
    for k in w_ref:                                                  # bit-exact
        assert torch.equal(w_res[k], w_ref[k]), k
    assert loss_rows(run_dir) == loss_rows(tmp_path / "ref")        # the curve before the cut is kept
    # the stability peak seen before the cut (step 3 here) travels in the checkpoint
    assert ref["peak_step"] < 5
    for k in ("peak_max_re_eig", "peak_step", "min_frac_stable", "peak_max_re_eig_W"):
        assert resumed[k] == pytest.approx(ref[k], rel=1e-9), k


def test_injected_nan_batch_is_skipped_and_W_stays_finite(tmp_path, mnist_dir):
    cfg = make_cfg([*QUICK_MNIST, "rule=w3", "lr=0.25", "data.shuffle=false"], tmp_path, mnist_dir)
    data, model, module, trainer = build(cfg, tmp_path)
    data.setup()
    data.train_set.tensors[0][300, 5] = float("nan")        # one image in the second batch
    trainer.fit(module, datamodule=data)
    assert module.record.faults == 1 and "non-finite" in module.record.fault_log[0] and "step 1" in module.record.fault_log[0]
    assert trainer.global_step == 3 and module.record.status == "running"     # 4 batches, 1 skipped
    assert torch.isfinite(model.W).all()


def test_forced_divergence_ends_with_status_not_crash(tmp_path, mnist_dir):
    over = [*QUICK_MNIST, "rule=w1", "lr=1.0", "data.train_subset=4096", "trainer.max_epochs=3",
            "fault.max_faults=5"]
    res = train(make_cfg(over, tmp_path, mnist_dir))        # returns: a diverged run is a result
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == "diverged" and res["faults"] >= 5
    assert torch.isfinite(torch.load(tmp_path / "weights.pt")["layers.0.W"]).all()
    # strict=true makes any such ending an error exit (here w2 out of its domain: diverged at once)
    strict = [*QUICK_MNIST, "rule=w2", "lr=1000", "fault.max_faults=2", "strict=true"]
    with pytest.raises(SystemExit, match="strict=true: the run ended with status 'diverged'"):
        train(make_cfg(strict, tmp_path / "strict", mnist_dir))


@pytest.mark.parametrize("override,message", [
    ("lr=0", "lr must be a positive finite number, got 0"),
    ("lr=nan", "lr must be a positive finite number, got nan"),
    ("model.layers=[0]", "layers must be a non-empty list of positive integers, got [0]"),
    ("data.batch_size=-4", "batch_size must be a positive integer, got -4"),
    ("solver.kwargs.tol=0", "tol must be a positive finite number, got 0"),
    ("solver.kwargs.max_iter=0", "max_iter must be a positive integer, got 0"),
    ("model.n_out=7", "model.n_out=7 does not match the data's 10 classes"),
    ("model.dynamics=ode", "unknown dynamics 'ode'; choose one of ['discrete', 'rate', 'voltage']"),
    ("fault.on_fault=ignore", "on_fault must be 'skip' or 'stop', got 'ignore'"),
    ("data.batch_size=100", None),
])
def test_validation_names_the_bad_value(tmp_path, mnist_dir, override, message):
    cfg = make_cfg([*QUICK_MNIST, override, "trainer.max_steps=1", "trainer.limit_val_batches=0"],
                   tmp_path, mnist_dir)
    if message is None:       # a sane value passes
        assert train(cfg)["status"] == "finished"
        return
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        train(cfg)
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"


def test_checkpoint_from_another_network_is_refused(tmp_path, mnist_dir):
    train(make_cfg([*QUICK_MNIST, "trainer.max_steps=1"], tmp_path / "a", mnist_dir))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"has layers.0.W of shape \(300, 300\), the model \(50, 50\)"):
        train(make_cfg([*QUICK_MNIST, "model.layers=[50]", f"ckpt_path={ckpt}"], tmp_path / "b", mnist_dir))
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        train(make_cfg([*QUICK_MNIST, f"ckpt_path={tmp_path}/nope.ckpt"], tmp_path / "c", mnist_dir))


def test_missing_mnist_says_where_and_leaves_nothing(tmp_path):
    root = tmp_path / "empty"
    with pytest.raises(FileNotFoundError) as e:
        vision.ensure(vision.get_set("mnist"), root, download=False)
    msg = str(e.value)
    assert str(root / "MNIST" / "raw") in msg and "train-images-idx3-ubyte" in msg and "data.root" in msg
    assert not root.exists()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        VisionDataModule(root=str(root), download=True).prepare_data()   # no network here
    assert not root.exists() or not any(root.rglob("*"))


def test_w1_adjoint_converges_in_float32():
    """Its default tolerance follows the dtype: a fixed 1e-8 is below float32's rounding."""
    from test_rules import instance, rel
    W, r, gain, D = instance(60, 16, sigma=0.9)
    exact = rules.w1(W, r, gain, D, 0.2, method="exact")
    dW, info = rules.w1(W.float(), r.float(), gain.float(), D.float(), 0.2, method="adjoint", return_info=True)
    assert info["converged"] and rel(dW.double(), exact) < 1e-5
    dW64, info = rules.w1(W, r, gain, D, 0.2, method="adjoint", return_info=True)
    assert info["converged"] and rel(dW64, exact) < 1e-12


def test_run_that_skipped_its_steps_reports_no_progress(tmp_path, mnist_dir, capfd):
    # σ_W = 1.5: the fixed points do not converge at the start, so every step is skipped
    over = [*QUICK_MNIST, "model.sigma_W=1.5", "solver.kwargs.max_iter=30"]
    res = train(make_cfg(over, tmp_path, mnist_dir))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["status"] == res["status"] == "no_progress"
    assert saved["faults"] == saved["attempted_steps"] == 4 and saved["steps"] == 0
    assert "not converged" in saved["fault_log"][0]
    out = capfd.readouterr().out
    assert "fprnn: no_progress in" in out and "faults 4 of 4 attempted steps" in out and "not converged" in out
    with pytest.raises(ValueError, match=r"max_skipped must be a fraction in \[0, 1\), got 1.5"):
        train(make_cfg([*QUICK_MNIST, "fault.max_skipped=1.5"], tmp_path / "b", mnist_dir))


def _train_script():
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("override,message", [
    ("lr=abc", "lr must be a positive finite number, got 'abc'"),
    ("ckpt_path=/nonexistent/last.ckpt", "ckpt_path=/nonexistent/last.ckpt: no such checkpoint file"),
    ("data.root=/nonexistent", "MNIST not found and downloads are off"),
])
def test_user_errors_are_the_kind_train_py_prints_in_one_line(tmp_path, override, message):
    with pytest.raises(_train_script().USER_ERRORS, match=re.escape(message)):
        train(make_cfg(["logger=none", "progress_bar=false", "data.download=false", override], tmp_path))


def test_a_user_error_prints_one_line_without_a_traceback(tmp_path):
    message = "lr must be a positive finite number, got 'abc'"
    cmd = [sys.executable, str(ROOT / "train.py"), "logger=none", "progress_bar=false", "data.download=false",
           f"hydra.run.dir={tmp_path}", "lr=abc"]
    env = dict(os.environ, WANDB_MODE="offline")
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "fprnn: failed in" in proc.stdout and "attempted steps" not in proc.stdout  # none before training
    assert proc.stderr.strip().splitlines()[-2:] == [f"error: {message}",
                                                     "(set HYDRA_FULL_ERROR=1 for the full traceback)"]
    full = subprocess.run(cmd, cwd=ROOT, env={**env, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert full.returncode == 1 and "Traceback" in full.stderr and message in full.stderr
