"""sweep.py: a grid of train.py processes, a summary table, resume, failures recorded."""
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def sweep(*words, check=None):
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), *map(str, words)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if check is not None:
        assert proc.returncode == check, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def rows(out):
    with (out / "summary.csv").open() as fh:
        return list(csv.DictReader(fh))


# the linear task solved by iteration: lr=20 makes W's fixed points unreachable within 3 steps
LIN = ["experiment=paper_linear", "solver=iterate", "trainer.max_steps=60", "fault.max_faults=3", "logger=csv",
       "callbacks=none"]
GRID = ["rule=w3", "lr=0.5,-1,20"]


def test_grid_summary_resume_and_failures(tmp_path):
    """Each point ends finished, failed (lr=-1 is refused) or diverged, and the sweep goes on; run
    again after a cut-off (a point's results lost), it reruns only the failed and the missing points."""
    out = tmp_path / "s=w"                                                  # '=' in a path is fine
    sweep(*GRID, *LIN, "--out", out, "--jobs", "2", check=1)
    table = rows(out)
    assert [(r["rule"], r["lr"]) for r in table] == [("w3", lr) for lr in ("0.5", "-1", "20")]
    for r in table:
        res = json.loads((out / f"{r['rule']}_lr{r['lr']}" / "results.json").read_text())
        assert r["status"] == res["status"] == {"0.5": "finished", "-1": "failed", "20": "diverged"}[r["lr"]]
        if r["lr"] == "0.5":
            assert float(r["loss_W"]) == float(f"{res['loss_W']:.4g}")
            assert r["test_acc"] == ""                       # no such value for regression
        if r["lr"] == "-1":
            assert "lr must be a positive finite number" in res["error"]
    assert set(table[0]) == {"rule", "lr", "status", "loss_W", "train_loss", "test_loss", "test_acc",
                             "max_re_eig", "frac_stable", "peak_max_re_eig", "peak_max_re_eig_W",
                             "wall_s"}
    assert (out / "summary.md").read_text().count("\n") == 5
    assert (out / "figures" / "loss.png").exists()
    kept = (out / "w3_lr20" / "results.json").stat().st_mtime
    (out / "w3_lr0.5" / "results.json").unlink()      # as if the sweep had been cut off there
    p = sweep(*GRID, *LIN, "--out", out, "--jobs", "2", check=1)
    assert p.stdout.count("[skip]") == 1 and "2 to run" in p.stdout and "[skip] w3_lr20" in p.stdout
    assert (out / "w3_lr20" / "results.json").stat().st_mtime == kept
    assert [r["status"] for r in rows(out)] == ["finished", "failed", "diverged"]


def test_a_grid_is_every_rule_with_every_lr_in_order():
    p = sweep("rule=w1,w3", "lr=0.5,-1,20", *LIN, "--out", "/tmp/grid", "--dry-run", check=0)
    points = [dict(w.split("=", 1) for w in line.split() if w.startswith(("rule=", "lr="))) for line in p.stdout.splitlines()]
    assert [(d["rule"], d["lr"]) for d in points] == [(rule, lr) for rule in ("w1", "w3") for lr in ("0.5", "-1", "20")]


def test_presets_and_bad_words():
    p = sweep("fig4", "solver=anderson", "--dry-run", check=0)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 5 and all("solver=anderson" in l and "euler_paper" not in l for l in lines)
    assert "lr=0.025" in lines[-1] and "rule=w1" in lines[0]
    assert "sweeps/fig4-solver_anderson/w1_lr0.001'" in lines[0]   # no '=' in paths: Hydra would choke
    p = sweep("fig9", check=None)
    assert p.returncode != 0 and "unknown preset 'fig9'" in p.stderr


def test_cluster_launcher_and_optuna_configs_compose():
    import pytest
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.gpus_per_node == 1
        cfg = compose(config_name="train", overrides=["hparams_search=lr_optuna"], return_hydra_config=True)
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
        assert cfg.hydra.sweeper.params.lr.startswith("tag(log")


def test_sweep_points_share_a_wandb_group_and_job_type(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import wandb_offline_records
    out = tmp_path / "grouped"
    sweep("rule=w3", "lr=0.5", "experiment=paper_linear", "trainer.max_steps=20", "callbacks=none",
          "--out", out, "--no-figures", check=0)
    (run,) = [r.run for r in wandb_offline_records(out / "w3_lr0.5") if r.WhichOneof("record_type") == "run"]
    assert run.run_group == "grouped" and run.job_type == "sweep"


def test_a_sweep_works_in_the_folder_it_is_started_from(tmp_path, monkeypatch, capsys):
    """The default out is ./sweeps/… of that folder, and each point's train.py runs there, so relative
    paths in the overrides (data.root, data.path) mean what the user typed."""
    import threading
    from fprnn.tools import sweep as sw
    monkeypatch.chdir(tmp_path)
    assert sw.main(["experiment=paper_linear", "rule=w3", "lr=0.3", "--dry-run"]) == 0
    assert f"hydra.run.dir='{tmp_path.resolve()}/sweeps/" in capsys.readouterr().out
    seen = {}

    def fake_run(cmd, **kw):
        seen["cwd"] = Path(kw.get("cwd") or Path.cwd()).resolve()
        (point.run_dir / "results.json").write_text(json.dumps({"status": "finished"}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(sw.subprocess, "run", fake_run)
    point = sw.Point("w3_lr0.3", "w3", "0.3", ["data.path=mine.npz"], tmp_path / "out" / "w3_lr0.3")
    assert sw.run_point(point, "g", False, 1, threading.Event()).result["status"] == "finished"
    assert seen["cwd"] == tmp_path.resolve()


def test_every_point_of_every_preset_composes_and_the_maze_points_build(tmp_path):
    """Each point's overrides compose and build (data, network, module): a typo in a point, or an option
    a point's rule refuses (fault.unsettled=train with a rule), fails here rather than in its process.
    The mazes rules get the settings they were measured with (the first mazes preset)."""
    from fprnn.tools.sweep import PRESETS, make_points
    from fprnn.training.run import build
    from helpers import make_cfg
    built = {}
    for preset, spec in PRESETS.items():
        if callable(spec.get("points")):      # neurogym: a point per task, asked of NeuroGym
            continue
        points = make_points(preset, spec.get("rule") or ["w1"], [str(lr) for lr in spec.get("lr") or [0.1]],
                             spec["base"], tmp_path / preset)
        for p in points:
            cfg = make_cfg([*p.overrides, f"rule={p.rule}", f"lr={p.lr}"])
            if preset == "mazes":
                built[p.name] = (cfg, build(cfg, tmp_path / preset / p.name)[2])
    rule_cfg, module = built["w3"]
    assert rule_cfg.solver.name == "anderson" and rule_cfg.model.sigma_W == 0.5 and rule_cfg.get("scheduler") is None
    assert module.unsettled == "leave_out" and module.max_nonconverged == 0.25 and module.clip_grad_norm is None
    assert rule_cfg.data.train_mazes // rule_cfg.data.batch_size * rule_cfg.trainer.max_epochs == 2500
    assert built["bptt"][1].unsettled == "train" and built["ff"][1].unsettled == "train"
