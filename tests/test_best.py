"""The best validation network is kept, tested and loadable; early stopping ends where it should."""
import csv
import json

import pytest
import torch

from fprnn.models.dense import FixedPointRNN
from fprnn.training.run import build, train

from helpers import QUICK_MNIST, make_cfg

RUN = [*QUICK_MNIST, "data.val_size=300", "rule=w3", "lr=0.5", "optimizer=momentum", "model.layers=[64]"]


def val_curve(run_dir, key):
    with open(run_dir / "csv" / "metrics.csv") as fh:
        return [(int(r["epoch"]), float(r[key])) for r in csv.DictReader(fh) if r.get(key)]


def accuracy(net, data):
    x, y = data.test_set.tensors
    return float((net(x).argmax(1) == y).double().mean())


def test_the_best_validation_network_is_kept_tested_and_loadable(tmp_path, mnist_dir):
    cfg = make_cfg([*RUN, "trainer.max_epochs=4"], tmp_path, mnist_dir)
    res = train(cfg)
    curve = val_curve(tmp_path, "val/acc")
    assert len(curve) == 4
    best_epoch, best_acc = max(curve, key=lambda e: (e[1], -e[0]))     # the first of equals
    assert res["weights"] == "best" and res["best_epoch"] == best_epoch
    assert res["best_score"] == pytest.approx(best_acc, abs=1e-6) and res["best_metric"] == "val/acc"
    best = tmp_path / "checkpoints" / "best.ckpt"
    net = FixedPointRNN.load(best)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 torch.load(tmp_path / "weights.pt").values()))
    data, *_ = build(cfg, tmp_path / "again")
    data.setup()
    assert res["test_acc"] == pytest.approx(accuracy(net, data), abs=1e-6)
    last = FixedPointRNN.load(tmp_path / "checkpoints" / "last.ckpt")
    assert res["last_test_acc"] == pytest.approx(accuracy(last, data), abs=1e-6)
    if best_epoch != 3:
        assert not torch.equal(last.W, net.W)
    with pytest.raises(FileNotFoundError, match="nothing.ckpt: not found"):
        FixedPointRNN.load(tmp_path / "checkpoints" / "nothing.ckpt")


def test_the_paper_protocol_reports_the_last_network(tmp_path, mnist_dir):
    res = train(make_cfg([*RUN, "data.val_on_test=true", "data.val_size=0"], tmp_path, mnist_dir))
    assert res["weights"] == "last" and "best_epoch" not in res
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()


def test_early_stopping_ends_after_patience_validations_without_improvement(tmp_path, mnist_dir):
    # "improvement" = a larger val/loss: the curve falls, so it stops after `patience` epochs
    res = train(make_cfg([*RUN, "trainer.max_epochs=6", "best.monitor=val/loss", "best.mode=max",
                          "best.patience=2"], tmp_path, mnist_dir))
    losses = [v for _, v in val_curve(tmp_path, "val/loss")]
    best, wait, stop = -float("inf"), 0, None
    for e, v in enumerate(losses):
        if v > best:
            best, wait = v, 0
        else:
            wait += 1
            if wait >= 2:
                stop = e
                break
    assert stop is not None and len(losses) == stop + 1 < 6
    assert res["status"] == "finished" and json.loads((tmp_path / "results.json").read_text())["best_metric"] == "val/loss"
    with pytest.raises(ValueError, match="best.patience must be a positive number of validations or null, got 0"):
        train(make_cfg([*RUN, "best.patience=0"], tmp_path / "bad", mnist_dir))
