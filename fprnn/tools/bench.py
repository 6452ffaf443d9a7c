"""Benchmark of the core: ``python -m fprnn.bench`` prints tables of

1. each rule at m=512, N=300, tanh, float32, against per-sample Python loops (the authors'
   approach, [`fprnn.core.reference`][fprnn.core.reference]) and one (m×N)·(N×N) matmul, as ratios in the same run;
2. each solver's iterations and milliseconds to residual 1e-5 from r = 0, for Gaussian and MNIST
   inputs, at W = 0.5 Z/√N and W = 0.95 Z/√N and at W scaled to ρ(W) = 0.95, plus the residual
   the paper's forward pass (Euler, dt/τ 0.01 × 500) leaves;
3. a w3 MNIST training step with the diagnostics monitors on and off;
4. one step with trained read-in and read-out against the paper's fixed ones, per rule (same W);
5. a training step of a network in time (experiment=cdm) starting at the fixed point of its static
   input against BPTT from rest, as the static period grows (``--only trials``);
5b. a training step with a distinct static input per trial against the tutorials' plain CTRNN loop:
   the start's stability check at its cost (``--only starts``);
6. (``--only memory``) resident memory along a 2000-step w3 run;
7. (``--only fallback --run <run dir>``) at a finished run's weights, over every MNIST image: the
   samples the solver leaves, how many the fallback settles (and whether at the fixed point a
   long Euler run reaches), the fallback samples per training batch and the time they add, and
   how many of 2,048 training images the solver puts on another fixed point than the dynamics;
8. (``--only conv``) the rules on a conv W (fprnn.models.conv): each kernel step's time in convolutions of
   the layer (C = 32, 14×14, batch 128), and the peak memory of one training step at C = 32,
   28×28, batch 128 (a fresh process each) against the 2.5 GB its dense W alone would take.

Times are medians of interleaved repeats; the machine is shared, so read ratios, not absolutes.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from fprnn.core import reference, rules, solvers
from fprnn.core.activations import get_activation
from fprnn.core.dynamics import get_dynamics


def timeit(fn, repeats: int) -> float:
    """Median wall time of fn() in ms (after one warm-up call)."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def table(title: str, header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.rjust(w[i]) for i, c in enumerate(r)) + " |"
    out = [f"\n## {title}", line(cells[0]), "|" + "|".join("-" * (x + 2) for x in w) + "|"]
    return "\n".join(out + [line(r) for r in cells[1:]])


def bench_rules(m: int, N: int, repeats: int, loop_samples: int) -> str:
    g = torch.Generator().manual_seed(0)
    W = 0.5 * torch.randn(N, N, generator=g) / math.sqrt(N)
    x = torch.randn(m, N, generator=g)
    act, dyn = get_activation("tanh"), get_dynamics("rate")
    r = solvers.anderson(dyn.state_map(W, x, act), torch.zeros_like(x)).u
    gain = act.df(r @ W.T + x)
    D = 0.1 * torch.randn(m, N, generator=g)
    lr = 0.1
    t_mm = timeit(lambda: r @ W.T, repeats * 5)
    # The loops run on `loop_samples` samples and are scaled to m: they are linear in m.
    k = min(loop_samples, m)
    scale = m / k
    loops = {
        "w1": scale * timeit(lambda: reference.w1(W, r[:k], gain[:k], D[:k], lr), 1),
        "w3": scale * timeit(lambda: reference.w3(W, r[:k], gain[:k], D[:k], lr), 1),
    }
    rows = []
    for name, fn in [("w1 (auto, default)", lambda: rules.w1(W, r, gain, D, lr)),
                     ("w1 (exact)", lambda: rules.w1(W, r, gain, D, lr, method="exact")),
                     ("w1 (adjoint)", lambda: rules.w1(W, r, gain, D, lr, method="adjoint", tol=1e-6)),
                     ("w2", lambda: rules.w2(W, r, gain, D, lr)),
                     ("w3", lambda: rules.w3(W, r, gain, D, lr)),
                     ("w4", lambda: rules.w4(W, r, gain, D, lr))]:
        t = timeit(fn, repeats)
        base = name.split()[0]
        loop = loops.get(base, loops["w3"] if base in ("w2", "w4") else None)
        rows.append([name, t, t / t_mm, loop if base in loops else "", loop / t if loop else ""])
    rows.append(["per-sample loop w1", loops["w1"], loops["w1"] / t_mm, "", ""])
    rows.append(["per-sample loop w3", loops["w3"], loops["w3"] / t_mm, "", ""])
    rows.append(["one (m×N)·(N×N) matmul", t_mm, 1.0, "", ""])
    return table(f"Rules: m={m}, N={N}, tanh, float32 (loops timed on {k} samples, scaled to m)",
                 ["rule", "ms", "× matmul", "loop ms", "loop / rule (w2, w4 vs w3's loop)"], rows)


def _weights(N: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    Z = torch.randn(N, N, generator=g) / math.sqrt(N)
    rho = float(torch.linalg.eigvals(Z).abs().max())
    return {"0.5 Z/√N": 0.5 * Z, "0.95 Z/√N": 0.95 * Z, "ρ(W)=0.95": 0.95 * Z / rho}


def bench_solvers(m: int, N: int, repeats: int, data_root: str | None) -> str:
    g = torch.Generator().manual_seed(1)
    act, dyn = get_activation("tanh"), get_dynamics("rate")
    inputs = {"gaussian": torch.randn(m, N, generator=g)}
    note = ""
    if data_root:
        try:
            from fprnn.data.vision import load
            p, _ = load("mnist", data_root, train=False, download=False)
            W_in = torch.randn(N, 784, generator=torch.Generator().manual_seed(2)) / math.sqrt(784)
            inputs["mnist"] = p[:m] @ W_in.T
        except FileNotFoundError:
            note = f" (MNIST not found under {data_root}: gaussian inputs only)"
    configs = [("anderson (default)", solvers.anderson, {}),
               ("anderson classic", solvers.anderson, {"mix_above": 0}),
               ("iterate", solvers.iterate, {}),
               ("iterate damped 0.5", solvers.iterate, {"damping": 0.5})]
    rows = []
    for iname, x in inputs.items():
        for wname, W in _weights(N, g).items():
            gmap = dyn.state_map(W, x, act)
            u0 = torch.zeros_like(x)
            sols = {s: fn(gmap, u0, tol=1e-5, **kw) for s, fn, kw in configs}
            ts = {s: [] for s, _, _ in configs}
            for _ in range(repeats):          # interleaved, so drift hits every solver alike
                for sname, fn, kw in configs:
                    t0 = time.perf_counter()
                    fn(gmap, u0, tol=1e-5, **kw)
                    ts[sname].append(1e3 * (time.perf_counter() - t0))
            t_it = statistics.median(ts["iterate"])
            for sname, _, _ in configs:
                sol, t = sols[sname], statistics.median(ts[sname])
                rows.append([iname, wname, sname, sol.iters_mean, int(sol.iters.max()),
                             sol.n_nonconverged, t, f"{t / t_it:.2f}× iterate"])
            e = solvers.euler(gmap, u0, dt=0.01, steps=500)
            rows.append([iname, wname, "euler_paper (0.01×500)", 500.0, 500, e.n_nonconverged,
                         timeit(lambda: solvers.euler(gmap, u0, dt=0.01, steps=500), 1),
                         f"residual left: max {e.max_residual:.3g}, mean {e.mean_residual:.3g}"])
    for r in rows:
        r += [""] * (8 - len(r))
    return table(f"Solvers to residual 1e-5 from r=0: m={m}, N={N}, tanh, float32{note}",
                 ["inputs", "W", "solver", "iters mean", "iters max", "not conv.", "ms", "note"], rows)


def _compose(overrides: list[str]):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    from fprnn.training import run  # noqa: F401  (config resolvers)
    conf = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _fit_ms_per_step(overrides: list[str], run_dir, warmup: int = 3) -> float:
    """Wall time per training step (callbacks included) after ``warmup`` steps."""
    import pytorch_lightning as pl

    from fprnn.training.run import build
    marks: dict[str, float] = {}

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, *_):
            if trainer.global_step == warmup and "t0" not in marks:
                marks["t0"], marks["s0"] = time.perf_counter(), trainer.global_step

        def on_train_end(self, trainer, *_):
            marks["t1"], marks["s1"] = time.perf_counter(), trainer.global_step

    data, model, module, trainer = build(_compose(overrides), run_dir)
    trainer.callbacks.append(Clock())
    trainer.fit(module, datamodule=data)
    return 1e3 * (marks["t1"] - marks["t0"]) / max(marks["s1"] - marks["s0"], 1)


def _median_ms(variants: dict[str, list[str]], repeats: int) -> dict[str, float]:
    """Median ms per training step of each variant (overrides), the variants interleaved so that
    a slow phase of the machine hits them alike."""
    import tempfile
    ts: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for j, (k, over) in enumerate(variants.items()):
                ts[k].append(_fit_ms_per_step(over, f"{tmp}/{j}_{i}"))
    return {k: statistics.median(v) for k, v in ts.items()}


def _mnist_steps(data_root: str, steps: int) -> list[str]:
    return ["experiment=paper_mnist", f"data.root={data_root}", "data.download=false",
            f"data.train_subset={512 * steps}", "trainer.max_epochs=1", "trainer.limit_val_batches=0",
            "logger=csv", "progress_bar=false"]


def bench_monitors(data_root: str, steps: int, repeats: int) -> str:
    """A w3 MNIST training step with the default monitors on, against one with them off."""
    base = [*_mnist_steps(data_root, steps), "rule=w3", "lr=0.25"]
    ms = _median_ms({k: [*base, k] for k in ("callbacks=none", "callbacks=default")}, repeats)
    off, on = ms["callbacks=none"], ms["callbacks=default"]
    rows = [["off (callbacks=none)", off, 1.0], ["on (callbacks=default)", on, on / off]]
    return table(f"Monitors: w3 MNIST step incl. Lightning, {steps} steps × {repeats} runs each, median "
                 f"(stability and angles every 50 steps, solver every step)",
                 ["monitors", "ms / step", "ratio"], rows)


STEP_RULES = ("w3", "w1", "w2", "jfb")


def _mnist_batch(data_root: str, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first m MNIST training images (flattened, in [0, 1]) and their labels."""
    from fprnn.data.datamodules import VisionDataModule
    data = VisionDataModule("mnist", root=data_root, download=False, val_size=0)
    data.setup()
    return data.train_set.tensors[0][:m], data.train_set.tensors[1][:m]


def bench_step(data_root: str, m: int, N: int, repeats: int) -> str:
    """The paper's training step (one layer, fixed read-in and read-out, SGD) two ways at the same
    W and MNIST batch: written out by hand — solve, δ = W_outᵀ(softmax − onehot), the rule, W += ΔW
    — and as fprnn trains: forward with a graph, torch's cross-entropy, backward (the rule is the
    fixed point's backward, fprnn.core.implicit), the optimizer's step. W is restored after each call, so
    both see the same work; the ratio is the cost of going through autograd, per pair of adjacent
    calls (its median and quartiles: on a shared machine a ratio of two medians drifts by ±5%)."""
    from fprnn.models.dense import FixedPointRNN
    p, y = _mnist_batch(data_root, m)
    net = FixedPointRNN(N, 784, 10, seed=0)
    W0 = net.W.detach().clone()
    opt = torch.optim.SGD([net.W], lr=1.0)
    onehot = F.one_hot(y, 10).to(net.dtype)
    rows = []
    for rule in STEP_RULES:
        eta = 0.02 if rule == "w2" else 0.25

        @torch.no_grad()
        def by_hand():
            fp = net.fixed_point(net.input(p))
            delta = (torch.softmax(net.readout(fp.r), 1) - onehot) @ net.W_out
            net.W.add_(rules.RULES[rule](net.W.detach(), fp.r, fp.gain, delta, eta))

        def autograd():
            opt.zero_grad()
            F.cross_entropy(net(p), y).backward()
            opt.step()

        net.set_backward(rule, eta)
        ts = {"hand": [], "autograd": []}
        for k in range(repeats + 1):
            # paired rounds, the order alternating: a pair shares the machine's state of the moment
            pair = (("hand", by_hand), ("autograd", autograd))
            for label, fn in pair if k % 2 else pair[::-1]:
                t = time.perf_counter()
                fn()
                if k:                       # the first round warms up
                    ts[label].append(1e3 * (time.perf_counter() - t))
                with torch.no_grad():
                    net.W.copy_(W0)
        ratios = sorted(a / h for a, h in zip(ts["autograd"], ts["hand"]))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        rows.append([rule, statistics.median(ts["hand"]), statistics.median(ts["autograd"]),
                     statistics.median(ratios), f"{q1:.3f}–{q3:.3f}"])
    return table(f"The paper's step by hand and through autograd: MNIST batch of {m}, N={N}, same W, {repeats} "
                 f"paired rounds", ["rule", "by hand ms", "autograd ms", "ratio (median of pairs)",
                                    "ratio quartiles"], rows)


READIN_RULES = ("w3", "w1", "jfb", "w2")


def bench_readin(data_root: str, m: int, N: int, repeats: int) -> str:
    """One training step — solve the batch's fixed points, the rule's ΔW, with a trained read-in
    also the read-in's update (gradient or reparameterized) and the read-out's gradient, then an
    Adam step on every trained tensor — with trained read-in/read-out/biases against the paper's
    fixed ones, on the same MNIST batch at the same initial W (so the solver's work is the same)."""
    from fprnn.models.dense import FixedPointRNN
    p, y = _mnist_batch(data_root, m)
    nets = {"fixed": FixedPointRNN(N, 784, 10, seed=0),
            "trained": FixedPointRNN(N, 784, 10, seed=0, train_readin=True, train_readout=True, bias=True)}
    rows = []
    for rule in READIN_RULES:
        ms = {}
        for label, net, readin in (("fixed", nets["fixed"], "gradient"), ("gradient", nets["trained"], "gradient"),
                                   ("reparam", nets["trained"], "reparam")):
            params = dict(net.named_parameters())
            opt = torch.optim.Adam(list(params.values()), lr=0.0)   # lr 0: the cost, not the move

            def step():
                net.set_backward(rule, 0.02, readin=readin)
                opt.zero_grad()
                F.cross_entropy(net(p), y).backward()
                opt.step()
            ms[label] = timeit(step, repeats)
        rows.append([rule, ms["fixed"], ms["gradient"], ms["gradient"] / ms["fixed"], ms["reparam"],
                     ms["reparam"] / ms["fixed"]])
    return table(f"Trained read-in: one step on an MNIST batch of {m}, N={N}, same initial W, median of {repeats} "
                 f"(solve + rule + read-in/read-out + Adam)", ["rule", "fixed ms", "trained (gradient) ms", "ratio",
                                                              "trained (reparam) ms", "ratio"], rows)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def bench_memory(data_root: str, steps: int, every: int, lr: float) -> str:
    """Resident memory along a long w3 run (default monitors on): it must not grow. Each reading
    is printed as it is taken. The default lr is 0.05: at larger rates w3 trained for 17 epochs
    drives W to where fixed points take hundreds of Anderson iterations (at the paper's 0.25 they
    stop converging), which makes the run slow without measuring anything more."""
    import tempfile

    import pytorch_lightning as pl

    from fprnn.training.run import build
    seen: list[tuple[int, float]] = []

    class Rss(pl.Callback):
        def on_train_batch_end(self, trainer, *_):
            if trainer.global_step % every == 0:
                seen.append((trainer.global_step, _rss_mb()))
                print(f"  step {seen[-1][0]:5d}: RSS {seen[-1][1]:.0f} MB "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _compose(["experiment=paper_mnist", "rule=w3", f"lr={lr}", f"data.root={data_root}",
                        "data.download=false", f"trainer.max_steps={steps}", "trainer.max_epochs=-1",
                        "fault.max_faults=1000000",   # a memory run must not end early
                        "trainer.limit_val_batches=0", "logger=csv", "progress_bar=false"])
        data, model, module, trainer = build(cfg, tmp)
        trainer.callbacks.append(Rss())
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=data)
    warm = next((r for s, r in seen if s >= 2 * every), seen[0][1])
    print(f"memory run: {trainer.global_step} steps applied, {module.record.faults} skipped as faults")
    rows = [[s, r, r - warm] for s, r in seen]
    return table(f"Resident memory of a {steps}-step w3 MNIST run, lr={lr} (MB; growth after step "
                 f"{2 * every})",
                 ["step", "RSS MB", "growth MB"], rows)


def _solve_all(layer, x: torch.Tensor, batch: int) -> list:
    return [layer.fixed_point(x[i:i + batch]).solution for i in range(0, len(x), batch)]


def bench_fallback(run_dir: str, data_root: str, batch: int, repeats: int) -> str:
    """At the weights of ``run_dir`` (one layer), every MNIST image (60,000 training and 10,000
    test) solved by the run's solver without the fallback, then with it: the counts left
    unconverged, in float32 (as trained) and float64. In float64 every sample handed to the
    fallback is solved again to 1e-10 and compared with forward Euler of the dynamics from r = 0
    (dt/τ = 0.05, to 1e-10): the distance shows whether the fallback lands on the fixed point
    the dynamics reach. Then the training-batch cost: per batch of ``batch`` training images, the
    samples handed over and the median time of the solve with and without the fallback."""
    from fprnn.data.datamodules import VisionDataModule
    from fprnn.models.dense import FixedPointRNN
    data = VisionDataModule("mnist", root=data_root, download=False, val_size=0)
    data.setup()
    p = torch.cat([data.train_set.tensors[0], data.test_set.tensors[0]])
    net = FixedPointRNN.load(run_dir)
    layer = net.layer
    fallback = layer.fallback or dict(solvers.DEFAULT_FALLBACK)
    rows, t0 = [], time.perf_counter()
    for dtype in (torch.float32, torch.float64):
        layer.to(dtype)
        x = layer.input(p.to(dtype))
        layer.fallback = None
        plain = _solve_all(layer, x, batch)
        layer.fallback = fallback
        full = _solve_all(layer, x, batch)
        left = sum(s.n_nonconverged for s in plain)
        handed = sum(int(s.fallback.sum()) for s in full)
        still = sum(s.n_nonconverged for s in full)
        why = ", ".join(s.failures() for s in full if s.n_nonconverged) or "-"
        dist = "-"
        if dtype == torch.float64 and handed:
            idx = torch.cat([torch.nonzero(s.fallback).squeeze(1) + i * batch for i, s in enumerate(full)])
            xs = x[idx]
            g = layer.dyn.state_map(layer.W.detach(), xs, layer.act)
            tight = solvers.follow(g, torch.zeros_like(xs), tol=1e-10, tau=layer.tau,
                                   jac=layer.dyn.state_jacobian(layer.W.detach(), xs, layer.act),
                                   **solvers.how_to_follow(fallback))
            ref = solvers.follow_euler(g, torch.zeros_like(xs), tol=1e-10, dt=0.05, steps=100_000, tau=layer.tau)
            both = tight.converged & ref.converged
            d = (tight.u - ref.u).abs().amax(1)[both]
            dist = (f"{int(both.sum())} of {handed} both settled: max {float(d.max()):.2g}, "
                    f"{int((d > 1e-6).sum())} > 1e-6 (Euler steps median {int(ref.iters.median())})")
        rows.append([str(dtype).replace("torch.", ""), len(p), left, handed, handed - still, still, why, dist])
    print(f"  (counts in {time.perf_counter() - t0:.0f} s)", flush=True)
    layer.to(torch.float32)
    x = layer.input(data.train_set.tensors[0])
    batches = [x[i:i + batch] for i in range(0, len(x) - batch + 1, batch)]
    layer.fallback = None
    hard = [b for b in batches if layer.fixed_point(b).solution.n_nonconverged]
    layer.fallback = fallback
    cost = []
    for label, on in (("without fallback", None), ("with fallback", fallback)):
        layer.fallback = on
        ms = [timeit(lambda b=b: layer.fixed_point(b), repeats) for b in hard[:8]]
        cost.append(statistics.median(ms))
    per_batch = sum(int(layer.fixed_point(b).solution.fallback.sum()) for b in batches) / len(batches)
    probe = data.train_set.tensors[0][:2048]
    other = int(net.multistable(probe).sum())
    counts = table(f"Fallback at the weights of {run_dir}: all {len(p)} MNIST images, batches of {batch}",
                   ["dtype", "images", "solver leaves", "to fallback", "settled", "still unconverged", "why",
                    "float64 fallback vs long Euler from r = 0"], rows)
    timing = table(f"Fallback cost per training batch of {batch} (float32): {len(hard)} of {len(batches)} batches "
                   f"need it", ["fallback samples / batch (all batches)", "solve ms, batch needing it, without",
                                "with", "ratio"],
                   [[per_batch, cost[0], cost[1], cost[1] / cost[0]]])
    return (counts + "\n" + timing + f"\n\nOf the first {len(probe)} training images, {other} have a solver's "
            f"fixed point other than the one the dynamics reach from rest (FixedPointRNN.multistable).")


def _interleaved(steps: dict, repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each step per round, after one warm-up round; the order reverses every
    round, so that neither step always runs after the same one."""
    ts = {label: [] for label in steps}
    for k in range(repeats + 1):
        order = list(steps.items())
        for label, fn in order if k % 2 else order[::-1]:
            t = time.perf_counter()
            fn()
            if k:
                ts[label].append(1e3 * (time.perf_counter() - t))
    return ts


def bench_trials(repeats: int, statics=(300, 2000, 5000), batch: int = 64, N: int = 128) -> str:
    """A training step of experiment=cdm's network in time (N=128, batch 64, w3, Adam) per static
    period: the trial starting at the fixed point of its static input against BPTT from rest
    through it, at the same weights and batch, in paired rounds of alternating order (the ratio is
    the median of the pairs'). Memory: what autograd saves for backward in the step."""
    from fprnn.models.ctrnn import TrialRNN
    from fprnn.data.neurogym_tasks import NeuroGymDataModule
    from fprnn.training.objectives import SavedBytes, step_losses
    rows = []
    for static_ms in statics:
        data = NeuroGymDataModule(kwargs={"use_expl_context": True, "timing": {"fixation": static_ms, "delay": 300}},
                                  batch_size=batch, val_trials=1, test_trials=1)
        b = next(iter(data.train_dataloader()))
        steps, saved = {}, {}
        for start in ("fixed_point", "rest"):
            net = TrialRNN(N, data.n_in, data.n_out, start=start, seed=0)
            net.set_backward("w3", 1.0)
            opt = torch.optim.Adam(net.parameters(), lr=1e-2)
            state = {k: v.clone() for k, v in net.state_dict().items()}

            def step(net=net, opt=opt, start=start, state=state):
                opt.zero_grad()
                with SavedBytes() as sb:
                    out = net(b["ob"], b["static"])
                (step_losses(out, b["gt"], b["weight"]).sum() / b["weight"].sum()).backward()
                opt.step()
                net.load_state_dict(state)
                saved[start] = sb.bytes / 2**20
            steps[start] = step
        ts = _interleaved(steps, repeats)
        ratios = sorted(r / f for f, r in zip(ts["fixed_point"], ts["rest"]))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        rows.append([static_ms, int(b["static"].min()), b["ob"].shape[1], statistics.median(ts["fixed_point"]),
                     statistics.median(ts["rest"]), statistics.median(ratios), f"{q1:.2f}–{q3:.2f}",
                     saved["fixed_point"], saved["rest"]])
    return table(f"A step of experiment=cdm (N={N}, batch {batch}, w3, Adam): start at the fixed point vs BPTT from "
                 f"rest, {repeats} paired rounds",
                 ["static ms", "static steps", "trial steps", "fixed_point ms", "rest ms", "rest / fixed_point",
                  "quartiles", "fixed_point graph MB", "rest graph MB"], rows)


class _TutorialCTRNN(torch.nn.Module):
    """The cognitive-task tutorials' continuous-time RNN (Yang & Molano-Mazón's NeuroGym tutorial):
    h ← (1 − α) h + α tanh(W_in u_t + W h), read out at every step; BPTT from rest."""

    def __init__(self, n_in: int, N: int, n_out: int, alpha: float):
        super().__init__()
        self.input2h, self.h2h = torch.nn.Linear(n_in, N), torch.nn.Linear(N, N)
        self.fc, self.alpha, self.N = torch.nn.Linear(N, n_out), alpha, N

    def forward(self, ob: torch.Tensor) -> torch.Tensor:
        h, out = ob.new_zeros(ob.shape[0], self.N), []
        for t in range(ob.shape[1]):
            h = (1 - self.alpha) * h + self.alpha * torch.tanh(self.input2h(ob[:, t]) + self.h2h(h))
            out.append(h)
        return self.fc(torch.stack(out, 1))


def _distinct_static_batch(batch: int, static: int, steps: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Trials whose static input differs in every trial, as a continuous condition makes it: fixation
    and two stimulus channels 1 ± c with c ~ U(−½, ½) for ``static`` steps, then noisy stimuli;
    a random action to report at every step."""
    c = torch.rand(batch, 1, 1, generator=g) - 0.5
    clean = torch.cat([torch.ones(batch, steps, 1), (1 + c).expand(-1, steps, 1), (1 - c).expand(-1, steps, 1)], 2)
    noise = 0.1 * torch.randn(batch, steps, 3, generator=g)
    noise[:, :static] = 0
    ob = clean + noise
    return {"ob": ob, "static": torch.full((batch,), static), "gt": torch.randint(0, 3, (batch, steps), generator=g),
            "weight": torch.ones(batch, steps)}


def bench_starts(repeats: int, shapes=((15, 72), (250, 307)), batch: int = 64, N: int = 128) -> str:
    """A training step (N=128, batch 64, Adam) with a distinct static input in every trial, as a
    multiple of the tutorials' plain CTRNN loop at the same shape: fprnn from rest, and the start at
    the fixed point with w3 under the default check (a certificate shared by the batch, exact
    eigenvalues for the starts it leaves open) and under ``stability="exact"`` (one nonsymmetric
    eigendecomposition per trial). Each network steps from the same weights every round."""
    from fprnn.models.ctrnn import TrialRNN
    from fprnn.training.objectives import step_losses
    rows, certified = [], {}
    for static, steps_n in shapes:
        b = _distinct_static_batch(batch, static, steps_n, torch.Generator().manual_seed(static))
        loss = lambda out: step_losses(out, b["gt"], b["weight"]).sum() / b["weight"].sum()
        nets = {"loop": _TutorialCTRNN(3, N, 3, 0.2)}
        for label, start, stability in (("rest", "rest", "auto"), ("fixed_point", "fixed_point", "auto"),
                                        ("fixed_point exact", "fixed_point", "exact")):
            nets[label] = TrialRNN(N, 3, 3, start=start, dt=20.0, tau=100.0, seed=0, stability=stability)
            nets[label].set_backward("w3", 1.0)
        fns = {}
        for label, net in nets.items():
            opt = torch.optim.Adam(net.parameters(), lr=3e-3)
            state = {k: v.clone() for k, v in net.state_dict().items()}

            def step(label=label, net=net, opt=opt, state=state):
                opt.zero_grad()
                loss(net(b["ob"]) if label == "loop" else net(b["ob"], b["static"])).backward()
                opt.step()
                net.load_state_dict(state)
                if label == "fixed_point":
                    certified[static] = net.report.certified
            fns[label] = step
        ts = _interleaved(fns, repeats)
        loop = statistics.median(ts["loop"])
        rows.append([f"{static} / {steps_n}", loop] + [statistics.median(ts[k]) / loop
                                                       for k in ("rest", "fixed_point", "fixed_point exact")]
                    + [f"{certified[static]} / {batch}"])
    return table(f"A step with a distinct static input per trial (N={N}, batch {batch}, Adam; w3 at the fixed-point "
                 f"start), as a multiple of the plain CTRNN loop's, {repeats} interleaved rounds",
                 ["static / trial steps", "plain loop ms", "fprnn from rest", "fixed-point start",
                  "fixed-point start, stability=exact", "starts certified"], rows)


CONV_RULES = ("w3", "w2", "w4", "jfb", "w1")


def bench_conv(repeats: int, C: int = 32, size: int = 14, m: int = 128) -> str:
    """Kernel steps in units of one convolution K ⋆ r of the batch, at the fixed point of a random
    kernel (σ_W 0.5) and random inputs, in the layer's row layout (hwc); w1 includes its
    matrix-free adjoint solve. Two rows repeat the convolution and w3 with channels-first rows."""
    from fprnn.models.conv import ConvFixedPointLayer
    from fprnn.core.operators import Conv2d
    layer = ConvFixedPointLayer(C, (size, size), seed=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, layer.N, generator=g)
    fp = layer.fixed_point(x)
    op, D = layer.operator(), 0.1 * torch.randn(m, layer.N, generator=g)
    t_conv = timeit(lambda: op(fp.r), repeats * 3)
    rows = [["one convolution K ⋆ r", t_conv, 1.0]]
    for rule in CONV_RULES:
        t = timeit(lambda: rules.RULES[rule](op, fp.r, fp.gain, D, 0.01), repeats)
        rows.append([f"{rule} kernel step", t, t / t_conv])
    chw = Conv2d(op.K, op.size, op.padding, layout="chw")      # the same rows read channels first
    for what, fn, n in (("one convolution K ⋆ r", lambda: chw(fp.r), repeats * 3),
                        ("w3 kernel step", lambda: rules.w3(chw, fp.r, fp.gain, D, 0.01), repeats)):
        t = timeit(fn, n)
        rows.append([f"{what}, rows channels first (layout chw)", t, t / t_conv])
    t_solve = timeit(lambda: layer.fixed_point(x), 3)
    rows.append([f"forward solve ({fp.solution.iters_mean:.0f} evaluations)", t_solve, t_solve / t_conv])
    out = table(f"Rules on a conv W: C={C}, {size}×{size}, k=3, batch {m}, float32 (× one convolution)",
                ["what", "ms", "× convolution"], rows)
    rows = [[rule, *_conv_step_memory(rule, C, 28, m)] for rule in ("w3", "w1", "bptt")]
    dense = (C * 28 * 28) ** 2 * 4 / 2 ** 20
    return out + "\n" + table(f"Peak memory of one training step: C={C}, 28×28 (N = {C * 784}), batch {m}, float32; "
                              f"a dense W alone: {dense:.0f} MB", ["rule", "peak RSS MB", "step adds MB", "step s"], rows)


def _conv_step_memory(rule: str, C: int, size: int, m: int) -> tuple[float, float, float]:
    """(peak RSS, peak RSS − RSS before the step, seconds) of one forward + backward + Adam step of
    a ConvRecurrentNet on random images, in a fresh process (the peak is the process's)."""
    import json
    import subprocess
    import sys
    code = f"""
import json, resource, time, torch
from fprnn.models.conv import ConvRecurrentNet
net = ConvRecurrentNet((1, {size}, {size}), channels={C}, stem_pool=1, readout_pool=4)
net.set_backward({rule!r}, 1e-3)
opt = torch.optim.Adam(net.parameters(), 1e-3)
p, y = torch.rand({m}, {size * size}), torch.randint(0, 10, ({m},))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter()
torch.nn.functional.cross_entropy(net(p), y).backward()
opt.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps([peak, peak - before, time.perf_counter() - t]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m", type=int, default=512)
    ap.add_argument("--N", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--loop-samples", type=int, default=64,
                    help="samples the per-sample loops run on (scaled to m; they are linear in m)")
    ap.add_argument("--data", default=os.environ.get("FPRNN_DATA", "data"),
                    help="folder holding MNIST/raw (default $FPRNN_DATA or data/)")
    ap.add_argument("--only", choices=["rules", "solvers", "monitors", "step", "readin", "memory", "fallback",
                                       "trials", "starts", "conv"],
                    default=None, help="one table (default: rules, solvers, monitors, step, readin, trials and starts; memory "
                                       "and fallback only when asked)")
    ap.add_argument("--run", default=None, help="run directory whose weights --only fallback measures at")
    ap.add_argument("--steps", type=int, default=None,
                    help="steps for --only monitors (60) / memory (2000)")
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate of the --only memory run")
    a = ap.parse_args(argv)
    print(f"# fprnn benchmark — torch {torch.__version__}, {torch.get_num_threads()} threads")
    if a.only in (None, "rules"):
        print(bench_rules(a.m, a.N, a.repeats, a.loop_samples), flush=True)
    if a.only in (None, "solvers"):
        print(bench_solvers(a.m, a.N, a.repeats, a.data), flush=True)
    if a.only in (None, "monitors"):
        print(bench_monitors(a.data, a.steps or 60, 3), flush=True)
    if a.only in (None, "step"):
        print(bench_step(a.data, a.m, a.N, a.repeats), flush=True)
    if a.only in (None, "readin"):
        print(bench_readin(a.data, a.m, a.N, a.repeats), flush=True)
    if a.only in (None, "trials"):
        print(bench_trials(a.repeats), flush=True)
    if a.only in (None, "starts"):
        print(bench_starts(a.repeats), flush=True)
    if a.only == "conv":
        print(bench_conv(a.repeats), flush=True)
    if a.only == "memory":
        print(bench_memory(a.data, a.steps or 2000, 100, a.lr), flush=True)
    if a.only == "fallback":
        if not a.run:
            ap.error("--only fallback needs --run <run dir> (a one-layer MNIST run's directory)")
        print(bench_fallback(a.run, a.data, a.m, a.repeats), flush=True)


if __name__ == "__main__":
    main()
