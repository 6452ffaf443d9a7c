"""What the README promises, each run as a user would: optimizers, loggers, callback groups,
fault handling, w2's domain, --multirun, the landscape of a run, W&B media."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fprnn.core import rules
from stack_reference import loss_and_grad
from fprnn.training.run import build, train

from helpers import QUICK_MNIST, make_cfg, wandb_offline_config, wandb_offline_history

ROOT = Path(__file__).resolve().parents[1]
F64 = ["model.dtype=float64", "solver.kwargs.tol=1e-12", "data.shuffle=false", "trainer.limit_val_batches=0"]


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_optimizers_act_on_the_rules_direction(tmp_path, mnist_dir, optimizer):
    """Three steps equal the core rule's ΔW handed as −gradient to the same torch optimizer."""
    cfg = make_cfg([*QUICK_MNIST, *F64, "rule=w3", "lr=0.25", f"optimizer={optimizer}",
                    "trainer.max_steps=3"], tmp_path, mnist_dir)
    data, model, module, trainer = build(cfg, tmp_path)
    data.setup()
    W = torch.nn.Parameter(model.W.detach().clone())
    opt = {"momentum": lambda p: torch.optim.SGD(p, lr=1.0, momentum=0.9),
           "adam": lambda p: torch.optim.Adam(p, lr=1e-3)}[optimizer]([W])
    x, y = data.train_set.tensors
    for b in range(3):
        p, t = x[256 * b: 256 * (b + 1)].double(), y[256 * b: 256 * (b + 1)]
        fp = model.fixed_point(model.input(p), W=W.detach())
        _, delta, _ = loss_and_grad("classification", model, fp.r, t)
        W.grad = -rules.w3(W.detach(), fp.r, fp.gain, delta, 0.25)
        opt.step()
    W0 = model.W.detach().clone()
    trainer.fit(module, datamodule=data)
    moved = float((W.detach() - W0).norm())
    assert moved > 0 and float((model.W.detach() - W.detach()).norm()) < 1e-10 * moved


def test_logger_none_writes_no_logs_and_callbacks_solver_logs_only_the_solver(tmp_path, mnist_dir):
    res = train(make_cfg([*QUICK_MNIST, "logger=none", "trainer.max_steps=2"], tmp_path / "a", mnist_dir))
    assert res["status"] == "finished" and (tmp_path / "a" / "results.json").exists()
    assert not (tmp_path / "a" / "csv").exists() and not (tmp_path / "a" / "wandb").exists()
    train(make_cfg([*QUICK_MNIST, "callbacks=solver", "trainer.max_steps=2"], tmp_path / "b", mnist_dir))
    header = (tmp_path / "b" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"solver/iters", "solver/max_residual", "solver/nonconverged"} <= set(header)
    assert not [h for h in header if h.startswith(("stability/", "angle/"))]


def test_on_fault_stop_ends_at_the_first_fault(tmp_path, mnist_dir):
    cfg = make_cfg([*QUICK_MNIST, "rule=w3", "lr=0.25", "data.shuffle=false", "fault.on_fault=stop"],
                   tmp_path, mnist_dir)
    data, model, module, trainer = build(cfg, tmp_path)
    data.setup()
    data.train_set.tensors[0][300, 5] = float("nan")        # second batch
    trainer.fit(module, datamodule=data)
    assert module.record.status == "diverged" and module.record.faults == 1 and trainer.global_step == 1
    assert torch.isfinite(model.W).all()


def test_w2_leaving_its_domain_in_training_is_a_fault_that_never_reaches_W(tmp_path, mnist_dir):
    res = train(make_cfg([*QUICK_MNIST, "rule=w2", "lr=1000", "fault.max_faults=2"], tmp_path, mnist_dir))
    assert res["status"] == "diverged" and res["faults"] == 2
    assert all("w2 left its domain" in f for f in res["fault_log"])
    W = torch.load(tmp_path / "weights.pt")["layers.0.W"]
    W0 = build(make_cfg([*QUICK_MNIST], tmp_path / "init", mnist_dir), tmp_path / "init")[1].W.detach()
    assert torch.equal(W, W0)        # no step was applied


def test_multirun_then_the_landscape_of_a_run(tmp_path):
    env = dict(os.environ, WANDB_MODE="offline")
    over = ["experiment=paper_linear", "model.layers=[20]", "data.m=10", "trainer.max_steps=20", "logger=csv",
            "progress_bar=false", "callbacks=none", "rule=w3"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--multirun", *over, "lr=0.1,0.3",
                           f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${lr}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = {lr: json.loads((tmp_path / lr / "results.json").read_text()) for lr in ("0.1", "0.3")}
    assert all(r["status"] == "finished" and r["steps"] == 20 for r in res.values())
    assert res["0.1"]["lr"] == 0.1 and res["0.3"]["loss_W"] < res["0.1"]["loss_W"]   # larger η, further
    land = subprocess.run([sys.executable, "-m", "fprnn.analysis.landscape", str(tmp_path / "0.3"), "--n-line", "5",
                           "--n-plane", "5"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert land.returncode == 0, land.stderr[-2000:]
    files = [Path(f) for f in land.stdout.split()]
    assert files and all(f.exists() and f.parent == tmp_path / "0.3" / "figures" for f in files)


def test_wandb_is_offline_by_default_with_values_and_eig_media(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    over = [o for o in QUICK_MNIST if not o.startswith("logger=")]
    res = train(make_cfg([*over, "data.train_subset=512", "callbacks.stability.every_n_steps=1",
                          "callbacks.stability.media_every=1"], tmp_path, mnist_dir))
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    hist = wandb_offline_history(tmp_path)
    test_acc = [h["test/acc"] for h in hist if "test/acc" in h]
    # with a held-out validation split the last network is tested, then the best one (reported)
    tested = [res["last_test_acc"], res["test_acc"]] if res["weights"] == "best" else [res["test_acc"]]
    assert test_acc == pytest.approx(tested, abs=1e-7)
    iters = [h["solver/iters"] for h in hist if "solver/iters" in h]
    import csv
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert iters == pytest.approx([float(r["solver/iters"]) for r in rows if r.get("solver/iters")])
    media = [h["stability/eig_W"] for h in hist if "stability/eig_W" in h]
    assert media and all(m["_type"] == "image-file" for m in media)
    assert wandb_offline_config(tmp_path)["rule"]["name"] == "w3"
