"""Restarts (fprnn.training.restarts): an attempt that has not learned by restart.by_epoch gives way
to another initialisation; its outputs are kept aside; a met threshold changes nothing; a resumed
run goes on with its attempt; the maze objective's val/solved against a per-maze count."""
import csv
import json
from types import SimpleNamespace

import pytest
import torch

from fprnn.data import mazes
from fprnn.models.maze_net import MazeNet
from fprnn.training.restarts import GiveWay, attempt_seed
from fprnn.training.run import build, train
from helpers import loss_rows, make_cfg

SMALL = ["experiment=mazes", "progress_bar=false", "logger=csv", "data.train_mazes=64", "data.val_mazes=16",
         "data.test_mazes=16", "data.test_mazes_large=4", "data.test_cells=[5]", "model.channels=4",
         "model.head_channels=4"]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_attempt_seeds_are_the_seed_first_then_distinct_draws():
    assert attempt_seed(7, 0) == 7
    later = {attempt_seed(s, k) for s in range(5) for k in range(1, 4)}
    assert len(later) == 15 and not later & set(range(5))
    assert attempt_seed(3, 2) == attempt_seed(3, 2)


def test_an_attempt_that_has_not_learned_gives_way_and_is_kept_aside(tmp_path, capsys):
    run = tmp_path / "run"
    # val/solved ≤ 1 never reaches 2: attempts 0 and 1 give way after one epoch, the last runs to the end
    res = train(make_cfg([*SMALL, "trainer.max_epochs=2", "restart.attempts=3", "restart.monitor=val/solved",
                          "restart.threshold=2", "restart.by_epoch=1"], run))
    assert res["status"] == "finished" and res["attempt"] == 2 and res["init_seed"] == attempt_seed(0, 2)
    assert res["steps"] == 4 and res["epochs"] == 2
    assert f"attempt 2 (init seed {attempt_seed(0, 2)}); 2 set aside in attempts/: not learned (val/solved" \
        in capsys.readouterr().out
    for k, record in enumerate(res["attempts"]):
        aside = run / "attempts" / str(k)
        assert record == json.loads((aside / "attempt.json").read_text())
        assert record["attempt"] == k and record["init_seed"] == attempt_seed(0, k)
        assert record["ended"] == "not learned" and record["epochs"] == 1 and record["steps"] == 2
        solved = [float(r["val/solved"]) for r in _rows(aside / "csv" / "metrics.csv") if r.get("val/solved")]
        assert len(solved) == 1 and record["best"] == pytest.approx(solved[0])
        assert (aside / "checkpoints" / "last.ckpt").is_file()
    assert len(_rows(run / "csv" / "metrics.csv")) > 0 and (run / "weights.pt").is_file()

    # attempt k's network is the one a run with its seed builds (the data, here its validation, stays)
    nets = [build(make_cfg(SMALL), tmp_path / "a", attempt=k)[1].state_dict() for k in (0, 1)]
    _, seeded, *_ = build(make_cfg([*SMALL, f"seed={attempt_seed(0, 1)}"]), tmp_path / "b")
    assert all(torch.equal(nets[1][name], t) for name, t in seeded.state_dict().items())
    assert not torch.equal(nets[0]["layers.0.W"], nets[1]["layers.0.W"])
    assert build(make_cfg(SMALL), tmp_path / "c", attempt=1)[0].seed == 0

    # a resumed run goes on with the attempt it was in, and no other gives way
    again = train(make_cfg([*SMALL, "trainer.max_epochs=3", "restart.attempts=3", "restart.monitor=val/solved",
                            "restart.threshold=2", "restart.by_epoch=1", "resume=true"], run))
    assert again["attempt"] == 2 and again["attempts"] == res["attempts"] and again["steps"] == 6
    assert sorted(p.name for p in (run / "attempts").iterdir()) == ["0", "1"]


def test_a_met_threshold_changes_nothing_and_val_solved_counts_settled_right_mazes(tmp_path):
    one = train(make_cfg([*SMALL, "trainer.max_epochs=2"], tmp_path / "one"))
    # every attempt's best val/solved is ≥ 0: the first one never gives way
    met = train(make_cfg([*SMALL, "trainer.max_epochs=2", "restart.attempts=4", "restart.monitor=val/solved",
                          "restart.threshold=0", "restart.by_epoch=1"], tmp_path / "met"))
    assert loss_rows(tmp_path / "met") == loss_rows(tmp_path / "one") and len(loss_rows(tmp_path / "one")) == 4
    assert met["test_maze_acc"] == one["test_maze_acc"] and met["attempt"] == 0 and "attempts" not in met
    assert not (tmp_path / "met" / "attempts").exists()

    # val/solved of the last validation: the validation mazes whose solve settled with every pixel right
    net = MazeNet.load(tmp_path / "one").eval()     # weights.pt: the best network, the last one here (…)
    best_epoch = one["best_epoch"]
    xs, ys = mazes.collate([(k, mazes.draw(0, "val", 4, k)) for k in range(16)])
    with torch.no_grad():
        right = (net(xs).argmax(1) == ys).flatten(1).all(1)
    solved = float((right & net.used).float().mean())
    logged = [float(r["val/solved"]) for r in _rows(tmp_path / "one" / "csv" / "metrics.csv") if r.get("val/solved")]
    assert logged[best_epoch] == pytest.approx(solved)
    assert 0 <= solved <= float(right.float().mean())


@pytest.mark.parametrize("overrides, why", [      # the preset's restart options with one changed
    (["restart.attempts=0"], "restart.attempts must be a positive integer, got 0"),
    (["restart.monitor=null"], "restart.attempts=4 needs restart.monitor"),
    (["restart.threshold=null"], "restart.threshold must be a finite number with restart.attempts=4, got None"),
    (["restart.threshold=nan"], "restart.threshold must be a finite number with restart.attempts=4, got nan"),
    (["restart.by_epoch=0"], "restart.by_epoch must be a positive integer, got 0"),
    (["restart.mode=up"], "restart.mode must be 'max' or 'min', got 'up'"),
])
def test_restart_options_name_what_is_wrong(tmp_path, overrides, why):
    with pytest.raises(ValueError) as err:
        build(make_cfg([*SMALL, *overrides]), tmp_path)
    assert why in str(err.value)


PRESET_RESTARTS = ["restart.attempts=4", "restart.monitor=val/loss", "restart.mode=min", "restart.threshold=0",
                   "restart.by_epoch=8"]


@pytest.mark.parametrize("overrides, why", [      # the maze preset's 4 attempts, by epoch 8
    ([*SMALL, "trainer.max_epochs=2"], "restart.by_epoch=8 is not before the end of training (trainer.max_epochs=2)"),
    (["experiment=paper_linear", "logger=csv", "trainer.max_epochs=9", *PRESET_RESTARTS],   # validation on the test set
     "judges attempts on a held-out validation split; this data has none"),
])
def test_where_no_attempt_could_give_way_the_run_makes_one_and_says_so(tmp_path, caplog, overrides, why):
    *_, trainer = build(make_cfg(overrides), tmp_path)
    assert not any(isinstance(c, GiveWay) for c in trainer.callbacks)
    assert why in caplog.text
    *_, trainer = build(make_cfg([*SMALL, "trainer.max_epochs=9"]), tmp_path / "b")
    assert sum(isinstance(c, GiveWay) for c in trainer.callbacks) == 1


def test_a_monitor_that_is_not_logged_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"restart.monitor='val/solve' is not logged in validation; logged: .*val/solved"):
        train(make_cfg([*SMALL, "trainer.max_epochs=2", "restart.attempts=2", "restart.monitor=val/solve",
                        "restart.threshold=0.5", "restart.by_epoch=1"], tmp_path / "run"))


def test_an_attempt_is_judged_on_its_best_also_across_a_resume():
    def validate(cb, epoch, value):
        trainer = SimpleNamespace(sanity_checking=False, current_epoch=epoch, should_stop=False,
                                  callback_metrics={cb.monitor: torch.tensor(value)})
        cb.on_validation_end(trainer, None)
        return trainer.should_stop

    cb = GiveWay("val/solved", 0.9, by_epoch=3)
    assert not validate(cb, 0, 0.95) and not validate(cb, 1, 0.2)
    resumed = GiveWay("val/solved", 0.9, by_epoch=3)
    resumed.load_state_dict(cb.state_dict())          # the checkpoint's: the best before the cut was 0.95
    assert not validate(resumed, 2, 0.1) and not resumed.gave_way
    fresh = GiveWay("val/solved", 0.9, by_epoch=3)    # without it the attempt would give way
    assert not validate(fresh, 1, 0.2) and validate(fresh, 2, 0.1) and fresh.gave_way and fresh.best == pytest.approx(0.2)
    sparse = GiveWay("val/solved", 0.9, by_epoch=2)   # validation every other epoch: the first from by_epoch on
    assert not validate(sparse, 0, 0.5) and validate(sparse, 2, 0.5)
    low = GiveWay("val/loss", 0.5, by_epoch=1, mode="min")
    assert not validate(low, 0, 0.4) and validate(GiveWay("val/loss", 0.5, by_epoch=1, mode="min"), 0, 0.6)


def test_a_diverged_attempt_gives_way_and_the_last_ends_with_its_status(tmp_path, monkeypatch):
    from fprnn.training.objectives import Mazes
    forward = Mazes.forward_step

    def non_finite(self, *args, **kwargs):      # every step's loss "non-finite": the first fault stops an attempt
        o = forward(self, *args, **kwargs)
        o.fault = "non-finite loss"
        return o

    monkeypatch.setattr(Mazes, "forward_step", non_finite)
    run = tmp_path / "run"
    res = train(make_cfg([*SMALL, "trainer.max_epochs=2", "restart.attempts=2", "restart.by_epoch=1",
                          "fault.on_fault=stop"], run))
    (aside,) = res["attempts"]
    assert aside["ended"] == "diverged" and aside["steps"] == 0 and aside["init_seed"] == 0
    assert (run / "attempts" / "0" / "attempt.json").is_file()
    assert res["status"] == "diverged" and res["attempt"] == 1 and res["faults"] == 1
