"""Learning-rate sweeps of the paper, one ``train.py`` process per point.

    python sweep.py fig2                       # linear task, w1/w2/w3 × η ∈ {0.03 … 3}
    python sweep.py fig4 solver=anderson       # a preset with overrides for every point
    python sweep.py rule=w1,w3 lr=0.01,0.1 data=mnist --jobs 2
    python sweep.py beyond                     # trained read-in/out: rules vs W ≡ 0, 1 and 2 layers
    python sweep.py conv                       # conv front end on Fashion-MNIST: rules vs W ≡ 0
    python sweep.py timescales --jobs 2        # tasks in time: fixed-point start vs BPTT from rest
    python sweep.py neurogym                   # every NeuroGym task: fixed-point start vs rest, 2 seeds
    python sweep.py mazes                      # mazes: bptt (the preset), K ≡ 0, w3, w1, jfb; extrapolation

Each point runs as its own process (its own W&B run, memory and, with trainer=ddp, its own
devices) in ``OUT/<rule>_lr<lr>/``. ``OUT/summary.csv`` and ``OUT/summary.md`` get one row per
point, and ``OUT/figures/`` the figures. A point that diverges or fails is recorded as such and the
sweep goes on; running the same sweep again skips the points already done and resumes
interrupted ones from their checkpoints.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Stability every 10 steps: w1's instabilities on MNIST can come and go within 50 steps.
MNIST_PAPER = ["experiment=paper_mnist", "solver=euler_paper", "callbacks.stability.every_n_steps=10"]
PRESETS: dict[str, dict] = {
    "fig2": {"base": ["experiment=paper_linear", "callbacks.angles.every_n_steps=0",
                      "callbacks.stability.every_n_steps=500", "trainer.log_every_n_steps=5"],
             "rule": ["w1", "w2", "w3"],
             "lr": [0.03, 0.1, 0.3, 1, 3], "doc": "linear task, 3500 full-batch steps (Figure 2)"},
    "fig3": {"base": ["experiment=paper_linear", "callbacks.angles.every_n_steps=10"], "rule": ["w2"],
             "lr": [0.03, 0.1, 0.3, 1], "doc": "angles θ12, θ13, θ23 while w2 learns (Figure 3)"},
    "fig4": {"base": MNIST_PAPER, "rule": ["w1"], "lr": [0.001, 0.0025, 0.005, 0.01, 0.025],
             "doc": "MNIST, w1, the authors' forward pass (Figure 4)"},
    "fig5": {"base": MNIST_PAPER, "rule": ["w3"], "lr": [0.01, 0.025, 0.05, 0.1, 0.25],
             "doc": "MNIST, w3, the authors' forward pass (Figure 5)"},
    "w2_mnist": {"base": MNIST_PAPER, "rule": ["w2"], "lr": [0.01, 0.025, 0.05, 0.1, 0.25],
                 "doc": "MNIST, w2 (not in the paper: too costly there)"},
    "w4_mnist": {"base": MNIST_PAPER, "rule": ["w4"], "lr": [0.005, 0.01, 0.02, 0.05, 0.1],
                 "doc": "MNIST, w4 (the authors' code)"},
}


def _beyond_points() -> list[tuple[str, str, str, list[str], dict]]:
    """(name, rule, lr, overrides, table columns) of the trained read-in/read-out comparison: on
    MNIST and Fashion-MNIST, one and two layers of 300, each rule and the same network with W ≡ 0.
    Adam makes η irrelevant except to w2, whose exact step needs 1 − ηκ > 0: η = 0.25 leaves the
    domain within 220 steps on MNIST, so w2 gets 0.02. bptt runs on one layer only: through two
    unrolled layers of 300 its step costs ~10× w3's (15 vs 68 ms), ~8 minutes a run here."""
    methods = {"w3": ("w3", "0.25", []), "w2": ("w2", "0.02", []), "w1": ("w1", "0.25", []),
               "bptt": ("bptt", "0.25", []), "jfb": ("jfb", "0.25", []),
               "W≡0 (MLP)": ("w3", "0.25", ["model.train_W=false", "model.sigma_W=0"])}
    points = []
    for data in ("mnist", "fashion_mnist"):
        for layers in ([300], [300, 300]):
            shape = [f"model.layers=[{','.join(map(str, layers))}]"] if len(layers) > 1 else []
            for label, (rule, lr, extra) in methods.items():
                if rule == "bptt" and len(layers) > 1:
                    continue
                tag = "mlp" if rule != label else rule
                points.append((f"{data}_{'x'.join(map(str, layers))}_{tag}", rule, lr,
                               [f"data={data}", *shape, *extra],
                               {"data": data, "layers": "×".join(map(str, layers)), "method": label}))
    return points


PRESETS["beyond"] = {"base": ["experiment=deep_mnist"],
                     "points": _beyond_points(), "lr": [],
                     "columns": ["data", "layers", "method", "lr", "status", "test_acc", "val_acc", "epochs",
                                 "wall_s", "step_ms_median", "peak_max_re_eig", "min_frac_stable", "frac_stable"],
                     "doc": "trained read-in/out (experiment=deep_mnist), MNIST and Fashion-MNIST, 1 and 2 "
                            "layers: w3, w2, w1, bptt, jfb and W ≡ 0"}
PRESETS["conv"] = {"base": ["experiment=conv_fashion"],
                   "points": [(name, rule, lr, extra, {"method": label}) for name, rule, lr, extra, label in (
                       ("w3", "w3", "0.25", [], "w3 (the preset)"), ("w1", "w1", "0.25", [], "w1"),
                       ("jfb", "jfb", "0.25", [], "jfb"), ("bptt", "bptt", "0.25", [], "bptt"),
                       ("mlp", "w3", "0.25", ["model.train_W=false", "model.sigma_W=0"], "W ≡ 0 (encoder + MLP head)"))],
                   "lr": [],
                   "columns": ["method", "lr", "status", "test_acc", "val_acc", "best_epoch", "epochs", "wall_s",
                               "step_ms_median", "peak_max_re_eig", "frac_stable"],
                   "doc": "Fashion-MNIST through a conv encoder (experiment=conv_fashion): w3, w1, jfb, bptt "
                          "and W ≡ 0"}

PRESETS["convrec"] = {"base": ["experiment=convrec_mnist", "data.train_subset=12800", "trainer.max_epochs=1"],
                      "points": [(name, rule, "1e-4", extra, {"method": label}) for name, rule, extra, label in (
                          ("w3", "w3", [], "w3"), ("w2", "w2", [], "w2"), ("w1", "w1", [], "w1 (gradient)"),
                          ("jfb", "jfb", [], "jfb"), ("bptt", "bptt", [], "bptt"),
                          ("ff", "w3", ["model.recurrent=false"], "K ≡ 0 (feed-forward)"))],
                      "lr": [],
                      "columns": ["method", "status", "test_acc", "val_acc", "wall_s", "step_ms_median",
                                  "solver_iters_mean", "peak_max_re_eig", "faults", "unconverged"],
                      "doc": "MNIST through a conv recurrent layer (experiment=convrec_mnist), 100 steps on "
                             "12,800 images: w3, w2, w1, jfb, bptt and K ≡ 0"}


#: the settings the rules were measured with on mazes (the first preset): a rule's step is derived at a fixed
#: point, so its mazes must settle — Anderson, σ_W 0.5, rk23 for the slow ones, a quarter of a batch left out
MAZE_RULE_SETTINGS = ["solver=anderson", "model.sigma_W=0.5", "model.fallback=default", "model.iters_per_side=8",
                      "fault.unsettled=leave_out", "fault.max_nonconverged=0.25", "module.clip_grad_norm=null",
                      "~scheduler", "data.train_mazes=20000", "trainer.max_epochs=4"]
PRESETS["mazes"] = {"base": ["experiment=mazes"],
                    "points": [(name, rule, eta, extra, {"method": label}) for name, rule, eta, extra, label in (
                        ("bptt", "bptt", "1", [], "bptt through plain iteration from rest (the preset)"),
                        ("ff", "bptt", "1", ["model.recurrent=false"], "K ≡ 0 (feed-forward), the preset's training"),
                        ("w3", "w3", "3e-3", MAZE_RULE_SETTINGS, "w3 (Anderson, σ_W 0.5, unsettled left out)"),
                        ("w1", "w1", "3e-3", MAZE_RULE_SETTINGS, "w1 (gradient; as w3)"),
                        ("jfb", "jfb", "3e-3", MAZE_RULE_SETTINGS, "jfb (as w3)"))],
                    "lr": [],
                    "columns": ["method", "status", "test_maze_acc", "test_acc", "maze_acc_6", "maze_acc_9",
                                "maze_acc_12", "maze_acc_16", "best_epoch", "wall_s", "faults", "unconverged"],
                    "doc": "Mazes (experiment=mazes): bptt (the preset), K ≡ 0, and w3, w1, jfb with the settings a "
                           "rule needs; whole-maze accuracy at the training size (4 cells) and, without retraining, "
                           "at 6, 9, 12 and 16 cells"}
PRESETS["maze_seeds"] = {"base": ["experiment=mazes"],
                         "points": [(f"seed{s}", "bptt", "1", [f"seed={s}"], {"seed": s}) for s in range(10)],
                         "lr": [],
                         "columns": ["seed", "status", "test_maze_acc", "test_settled", "maze_acc_9", "settled_9",
                                     "path_independent_4", "path_independent_9", "peak_max_re_eig", "best_epoch",
                                     "attempt", "wall_s"],
                         "doc": "the maze preset (or it with the overrides given, e.g. model.channels=32) on seeds "
                                "0–9: whole-maze accuracy and the share settled at the training size and at twice "
                                "the side (9 cells), the share of random starts that reach rest's fixed point, peak "
                                "stability, and the attempt that ran to the end (restart.*)"}


def _timescales_points() -> list[tuple[str, str, str, list[str], dict]]:
    """The paper's multi-timescale question (section 4): on three NeuroGym tasks with a static
    first period (fixation; in ContextDecisionMaking also the context cue), a network in time that
    starts at the fixed point of the static input (w3 as the start's backward) against BPTT from
    rest through the static period, as that period grows from 300 ms to 2 s and 5 s; 300 steps each,
    3 seeds, Adam at 0.01 (on ContextDecisionMaking, 300 ms, seed 0, 300 steps: validation
    performance 0.77 at 0.01, 0.08 at experiment=cdm's 3e-3, which needs ~600 steps). Timings are
    fixed so that each task is well posed (experiment=cdm's comment)."""
    tasks = {"ContextDecisionMaking-v0": "{timing:{fixation:%d}}",    # explicit context, delay 300 ms: the preset's
             "PerceptualDecisionMaking-v0": "{timing:{fixation:%d,stimulus:500}}",
             "GoNogo-v0": "{timing:{fixation:%d}}"}
    points = []
    for task, kwargs in tasks.items():
        for static_ms in (300, 2000, 5000):
            for start in ("fixed_point", "rest"):
                for seed in (0, 1, 2):
                    points.append((f"{task.split('-')[0]}_{static_ms}ms_{start}_s{seed}", "w3", "1",
                                   [f"data.task={task}", f"data.kwargs={kwargs % static_ms}", f"model.start={start}",
                                    f"seed={seed}", "optimizer.lr=0.01"],
                                   {"task": task.split("-")[0], "static_ms": static_ms, "start": start, "seed": seed}))
    return points


PRESETS["timescales"] = {"base": ["experiment=cdm", "trainer.max_epochs=3", "data.test_trials=1024"],
                         "points": _timescales_points(), "lr": [],
                         "columns": ["task", "static_ms", "start", "seed", "status", "test_perf", "val_perf",
                                     "step_ms_median", "graph_mb_max", "start_from_rest", "start_stability_max",
                                     "faults", "wall_s"],
                         "group": ["task", "static_ms", "start"],
                         "doc": "tasks in time: start at the static input's fixed point (w3) vs BPTT from rest, "
                                "static period 0.3, 2 and 5 s, 3 tasks × 3 seeds"}
def _neurogym_points() -> list[tuple[str, str, str, list[str], dict]]:
    """Every NeuroGym task at one budget (experiment=cdm's network, its defaults for each task:
    data.kwargs={}), starting at the fixed point of the static input (w3) and from rest, 2 seeds;
    a task that cannot be trained gets one point, whose results.json says why."""
    from fprnn.data.neurogym_tasks import refusal, task_names
    points, refused = [], {task: refusal(task) for task in task_names()}
    for seed in (0, 1):             # seed 0 of every task first: a sweep cut short is one whole seed
        for task in task_names():
            for start in ("fixed_point", "rest"):
                if refused[task] and (start, seed) != ("fixed_point", 0):
                    continue
                points.append((f"{task.split('-v')[0]}_{start}_s{seed}", "w3", "1",
                               [f"data.task={task}", "data.kwargs={}", f"model.start={start}", f"seed={seed}",
                                "optimizer.lr=0.01"],
                               {"task": task, "start": start, "seed": seed}))
    return points


PRESETS["neurogym"] = {"base": ["experiment=cdm", "trainer.max_epochs=3", "data.val_trials=256",
                                 "data.test_trials=512"],
                        "points": _neurogym_points, "lr": [],
                        "columns": ["task", "start", "seed", "status", "test_chance", "test_perf", "test_r2",
                                    "val_perf", "val_r2", "start_from_rest", "start_unstable",
                                    "start_stability_max", "faults", "wall_s", "error"],
                        "group": ["task", "start"],
                        "doc": "every NeuroGym task, 300 steps of experiment=cdm's network with each task's own "
                               "defaults: fixed-point start (w3) vs BPTT from rest, 2 seeds"}
# max_re_eig, frac_stable: per-sample, at the final W; peak_*: the largest seen during training,
# per sample and of eig(W) itself (the authors' check, a proxy: see docs/concepts/rules.md)
COLUMNS = ["rule", "lr", "status", "loss_W", "train_loss", "test_loss", "test_acc", "max_re_eig",
           "frac_stable", "peak_max_re_eig", "peak_max_re_eig_W", "wall_s"]
DONE = ("finished", "diverged")


@dataclass
class Point:
    name: str
    rule: str
    lr: str
    overrides: list[str]
    run_dir: Path
    columns: dict = field(default_factory=dict)     # what the preset says of it (data, method, …)
    result: dict = field(default_factory=dict)


def make_points(preset: str, rules: list[str], lrs: list[str], overrides: list[str], out: Path) -> list[Point]:
    """The grid rule × lr, or a preset's own list of points: the sweep's overrides, then the
    point's own (its data, layers, …)."""
    listed = PRESETS.get(preset, {}).get("points")
    if callable(listed):        # made when asked for (the neurogym preset asks every task)
        listed = listed()
    if listed is None:
        return [Point(f"{r}_lr{lr}", r, lr, overrides, out / f"{r}_lr{lr}") for r in rules for lr in lrs]
    return [Point(name, rule, lr, merge([*overrides, *extra]), out / name, cols)
            for name, rule, lr, extra, cols in listed]


def parse(argv: list[str]) -> tuple[str, list[str], list[str], list[str]]:
    """(preset or 'custom', rules, lrs, other overrides) from the command line words."""
    preset, rules, lrs, rest = "custom", None, None, []
    for word in argv:
        if "=" not in word:
            if word not in PRESETS:
                raise SystemExit(f"unknown preset {word!r}; choose one of {sorted(PRESETS)} "
                                 f"or give a grid such as rule=w1,w3 lr=0.01,0.1")
            preset = word
        elif word.startswith(("rule=", "lr=")) and "points" in PRESETS.get(preset, {}):
            raise SystemExit(f"preset {preset!r} has its own rules and learning rates; got {word!r}")
        elif word.startswith("rule="):
            rules = [r for r in word[5:].split(",") if r]
        elif word.startswith("lr="):
            lrs = [v for v in word[3:].split(",") if v]
        else:
            rest.append(word)
    p = PRESETS.get(preset, {"base": [], "rule": ["w3"], "lr": [0.25]})
    rules = rules or list(p.get("rule", []))
    lrs = lrs or [str(v) for v in p["lr"]]
    for v in lrs:
        try:
            float(v)
        except ValueError:
            raise SystemExit(f"lr values must be numbers, got {v!r}") from None
    return preset, rules, lrs, merge([*p["base"], *rest])


def merge(overrides: list[str]) -> list[str]:
    """Later overrides of the same key replace earlier ones (Hydra refuses duplicates)."""
    out: dict[str, str] = {}
    for o in overrides:
        out[o.split("=", 1)[0].lstrip("+~")] = o
    return list(out.values())


def default_out(preset: str, rules, overrides: list[str]) -> Path:
    extra = [o for o in overrides if o not in PRESETS.get(preset, {}).get("base", [])]
    # '=' and ',' would break Hydra's override grammar in hydra.run.dir
    tag = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", o).strip("_") for o in extra)[:80]
    name = preset if preset != "custom" else f"custom-{'_'.join(rules)}"
    return Path("sweeps") / (name + (f"-{tag}" if tag else ""))     # in the folder the sweep runs from


def read_result(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def command(point: Point, group: str, wandb_group: bool) -> list[str]:
    cmd = [sys.executable, str(ROOT / "train.py"), *point.overrides, f"rule={point.rule}",
           f"lr={point.lr}", f"hydra.run.dir='{point.run_dir}'", "progress_bar=false"]
    if wandb_group:
        cmd += [f"logger.wandb.group={group}", "logger.wandb.job_type=sweep"]
    if (point.run_dir / "checkpoints" / "last.ckpt").exists():
        cmd.append("resume=true")       # an interrupted or failed point continues where it was
    return cmd


def run_point(point: Point, group: str, wandb_group: bool, threads: int, stop: threading.Event) -> Point:
    if stop.is_set():
        point.result = {"status": "not run"}
        return point
    point.run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), WANDB_SILENT="true",
               WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    t0 = time.perf_counter()
    with open(point.run_dir / "sweep_point.log", "a") as log:
        # from the sweep's own folder: relative paths in the overrides (data.root, data.path) mean there what they
        # mean to the user who typed them
        proc = subprocess.run(command(point, group, wandb_group), env=env, stdout=log, stderr=subprocess.STDOUT)
    res = read_result(point.run_dir)
    if not res:
        res = {"status": "failed", "error": f"train.py exited with code {proc.returncode} before "
                                            f"writing results (see {point.run_dir / 'sweep_point.log'})"}
    elif proc.returncode != 0 and res.get("status") in DONE:
        res["status"] = "failed"
    res.setdefault("wall_s", time.perf_counter() - t0)
    point.result = res
    return point


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(out: Path, points: list[Point], columns: list[str] = COLUMNS, group: list[str] | None = None) -> None:
    own = lambda p, c: p.columns[c] if c in p.columns else p.rule if c == "rule" else p.lr if c == "lr" else None
    rows = [{c: own(p, c) if own(p, c) is not None else p.result.get(c) for c in columns} for p in points]
    with (out / "summary.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})
    (out / "summary.md").write_text(_markdown(columns, [[_fmt(r[c]) for c in columns] for r in rows]))
    if group:
        _write_grouped(out, rows, columns, group)


def _markdown(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def _write_grouped(out: Path, rows: list[dict], columns: list[str], group: list[str]) -> None:
    """``summary_grouped.md``: the points grouped by the ``group`` columns (over seeds), each
    numeric column as mean ± standard deviation over the group's finished points, with their count."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[c] for c in group), []).append(r)
    numeric = [c for c in columns if c not in group and c not in ("seed", "status")
               and any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows)]
    table = []
    for key, members in groups.items():
        done = [r for r in members if r.get("status") == "finished"]
        cells = [_fmt(k) for k in key] + [f"{len(done)}/{len(members)}"]
        for c in numeric:
            vals = [float(r[c]) for r in done if isinstance(r.get(c), (int, float))]
            cells.append("" if not vals else f"{statistics.mean(vals):.4g} ± {statistics.pstdev(vals):.2g}")
        table.append(cells)
    (out / "summary_grouped.md").write_text(_markdown([*group, "finished", *numeric], table))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Run a learning-rate sweep, one train.py process per point.",
        epilog="presets: " + "; ".join(f"{k}: {v['doc']}" for k, v in PRESETS.items()))
    ap.add_argument("words", nargs="*", help="a preset name and/or overrides (rule=a,b lr=x,y key=value)")
    ap.add_argument("--out", type=Path, default=None, help="sweep directory (default sweeps/<preset>[-overrides])")
    ap.add_argument("--jobs", type=int, default=1, help="points run at once on this machine")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    ap.add_argument("--no-figures", action="store_true")
    a = ap.parse_intermixed_args(argv)     # overrides may follow the options: --out DIR rule=w1,w3
    if a.jobs < 1:
        raise SystemExit(f"--jobs must be ≥ 1, got {a.jobs}")
    preset, rules, lrs, overrides = parse(a.words)
    out = (a.out or default_out(preset, rules, overrides)).resolve()
    group = out.name
    wandb_group = not any(o.startswith(("logger=", "~logger")) for o in overrides)
    points = make_points(preset, rules, lrs, overrides, out)
    columns = PRESETS.get(preset, {}).get("columns", COLUMNS)
    group_by = PRESETS.get(preset, {}).get("group")
    if a.dry_run:
        for p in points:
            print(" ".join(command(p, group, wandb_group)))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"preset": preset, "rules": rules, "lrs": lrs,
                                                "overrides": overrides}, indent=2))
    todo = []
    for p in points:
        res = read_result(p.run_dir)
        if res.get("status") in DONE:
            p.result = res
            print(f"[skip] {p.name}: already {res['status']}")
        else:
            todo.append(p)
    print(f"sweep {group}: {len(points)} points, {len(todo)} to run, {a.jobs} at a time → {out}", flush=True)
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: (stop.set(), print("\nstopping: running points save "
                                                                          "and end; rerun to resume", flush=True)))
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    done = len(points) - len(todo)
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=a.jobs) as pool:
            futures = [pool.submit(run_point, p, group, wandb_group, threads, stop) for p in todo]
            for f in as_completed(futures):
                p = f.result()
                done += 1
                r = p.result
                metric = (f"J={_fmt(r.get('loss_W'))}" if r.get("loss_W") is not None
                          else f"perf={_fmt(r.get('test_perf'))}" if r.get("test_perf") is not None
                          else f"acc={_fmt(r.get('test_acc'))}")
                print(f"[{done}/{len(points)}] {p.name}: {r.get('status')} {metric} "
                      f"max_re_eig={_fmt(r.get('max_re_eig'))} ({_fmt(r.get('wall_s'))} s, "
                      f"sweep {time.perf_counter() - t0:.0f} s)", flush=True)
                write_summary(out, points, columns, group_by)
    finally:
        signal.signal(signal.SIGINT, previous)
    write_summary(out, points, columns, group_by)
    print((out / ("summary_grouped.md" if group_by else "summary.md")).read_text())
    if not a.no_figures:
        try:
            from fprnn.analysis.figures import make_figures
            files = make_figures(out)
            print(f"figures: {out / 'figures'} ({len(files)} files)")
        except Exception as e:   # figures are a convenience; the table is the result
            print(f"figures failed: {type(e).__name__}: {e}")
    if stop.is_set():
        return 130
    return 1 if any(p.result.get("status") not in DONE for p in points) else 0
