"""What a trained network in time did and how: psychometric curves per context, example trials,
state trajectories on their principal components, and the fixed points of the trained dynamics
for each condition's constant input (``python -m fprnn.figures RUN`` draws them for a run of
``model=ctrnn``; ``fixed_points.json`` holds the points with their eigenvalues).

The fixed points (Sussillo & Barak 2013; Mante et al. 2013 for this task): for each condition —
context × signed coherence in ContextDecisionMaking, the test trials grouped by
``data.conditions`` and their ground truth elsewhere — the constant input is the mean input of its
trials over the stimulus period (the first period after the static start; its noise averages out),
and [`fprnn.analysis.fixed_points.trial_fixed_points`][fprnn.analysis.fixed_points.trial_fixed_points] finds every fixed point Newton's method reaches from
states the trials visit.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from fprnn.analysis.fixed_points import trial_fixed_points
from fprnn.training.checkpoint import atomic_write_text, saved_config
from fprnn.models.ctrnn import TrialRNN


def load_run(run: Path):
    """The trained network and its data module (the test trials), rebuilt from the run's config."""
    import hydra
    cfg = saved_config(run)
    data = hydra.utils.instantiate(cfg.data)
    data.setup()
    return TrialRNN.load(run), data


def signed_coherence(info: dict, target: int) -> float | None:
    """The coherence of a two-choice trial, signed by its answer (+ for choice 1, − for choice 2)."""
    if "coh" not in info:
        return None
    return float(info["coh"]) * (1 if int(target) == 1 else -1)


def condition_of(info: dict, target: float, keys: list[str]) -> tuple[str, tuple[float, ...]]:
    """(context, levels): a trial's condition for the analysis. The context is NeuroGym's, else the
    first condition the trial has in words (a trials file's), else ''; the levels are the signed
    coherence, else every numeric condition the trial has (a multi-bit task's bits), else its target
    at the answer step (an action, or a continuous target's first channel)."""
    own = [k for k in keys if k not in ("context", "coh") and k in info]
    named = next((str(info[k]) for k in own if isinstance(info[k], str)), "")     # a condition named by a word
    context = info.get("context", "") if "context" in keys else named
    coh = signed_coherence(info, target) if "coh" in keys else None
    numbers = tuple(float(info[k]) for k in own if not isinstance(info[k], str))
    return context, (coh,) if coh is not None else numbers or (float(target),)


def condition_labels(info: dict, keys: list[str]) -> tuple[str, list[str]]:
    """(what the context is called, what each level is called) for trials like ``info``: the
    task's own condition names (a trials file's ``condition_names``, NeuroGym's info keys)."""
    own = [k for k in keys if k not in ("context", "coh") and k in info]
    context = "context" if "context" in keys and "context" in info else \
        next((k for k in own if isinstance(info[k], str)), "")
    if "coh" in keys and "coh" in info:
        return context, ["signed coherence"]
    return context, [k for k in own if not isinstance(info[k], str)] or ["target at the answer step"]


def describe(context: str, levels, context_name: str, names: list[str]) -> str:
    """One condition in words, e.g. ``context 1, signed coherence +15`` or ``bit0 +1, bit1 -1``."""
    parts = [f"{context_name} {context}".strip()] if str(context) != "" else []
    return ", ".join(parts + [f"{n} {v:+g}" for n, v in zip(names, levels)])


def binned(levels: list[float], most: int = 8) -> dict[float, float]:
    """Each level's representative: itself when there are at most ``most`` distinct levels, else
    the mean of its quantile bin (continuous conditions make a condition per trial otherwise)."""
    distinct = sorted(set(levels))
    if len(distinct) <= most:
        return {v: v for v in distinct}
    bins = [distinct[len(distinct) * b // most:len(distinct) * (b + 1) // most] for b in range(most)]
    return {v: round(sum(b) / len(b), 6) for b in bins for v in b}


@torch.no_grad()
def analyse_run(run: Path, n_trials: int = 256, n_starts: int = 128) -> dict:
    """Trajectories of the first ``n_trials`` test trials, their PCs, and the fixed points per
    condition (see the module docstring), written to ``run/fixed_points.json``."""
    model, data = load_run(run)
    model.double()
    k = min(n_trials, len(data.test_set))
    items = [data.test_set[i] for i in range(k)]
    batch = data._collate(items)
    R = model.states(batch["ob"].double(), batch["static"])
    mask = batch["mask"]
    flat = R[mask]
    mean = flat.mean(0)
    _, _, V = torch.linalg.svd(flat - mean, full_matrices=False)
    pcs = V[:3]
    conds: dict[tuple, list[int]] = defaultdict(list)
    keyed = [condition_of(trial.info, float(trial.gt[trial.answer].reshape(-1)[0]), data.condition_keys)
             for _, trial in items]
    dims = {len(c[1]) for c in keyed}
    if len(dims) != 1:
        raise ValueError(f"the test trials have conditions of {sorted(dims)} numbers; every trial needs the same")
    per_dim = [binned([c[1][d] for c in keyed]) for d in range(dims.pop())]
    for i, (context, values) in enumerate(keyed):
        conds[(context, tuple(b[v] for b, v in zip(per_dim, values)))].append(i)
    context_name, level_names = condition_labels(items[0][1].info, data.condition_keys)
    inputs, order = [], []
    for cond, rows in sorted(conds.items(), key=lambda c: (str(c[0][0]), c[0][1])):
        segs = [items[i][1] for i in rows]
        # the stimulus period: from the end of the static start to the next change of period
        ob = torch.stack([torch.from_numpy(t.ob[t.static:t.static + stimulus_steps(t)]).double().mean(0) for t in segs])
        inputs.append(ob.mean(0))
        order.append(cond)
    g = torch.Generator().manual_seed(0)
    starts = flat[torch.randperm(len(flat), generator=g)[:n_starts]]
    found = trial_fixed_points(model, torch.stack(inputs), starts)
    out = {"pcs_mean": mean.tolist(), "pcs": pcs.tolist(), "context_name": context_name,
           "level_names": level_names, "conditions": []}
    for (context, levels), u, points in zip(order, inputs, found):
        out["conditions"].append({
            "context": context, "level": levels[0] if len(levels) == 1 else list(levels),
            "label": describe(context, levels, context_name, level_names), "input": u.tolist(),
            "fixed_points": [{"pc": ((p["r"] - mean) @ pcs.T).tolist(), "stable": p["stable"], "max_re_eig": p["max_re"],
                              "eig_top": [[float(z.real), float(z.imag)] for z in p["eig"][:10]],
                              "residual": p["residual"], "r": p["r"].tolist()} for p in points]})
    atomic_write_text(run / "fixed_points.json", json.dumps(out))
    return {"model": model, "data": data, "batch": batch, "R": R, "mean": mean, "pcs": pcs,
            "conds": conds, "items": items, "analysis": out}


def stimulus_steps(trial) -> int:
    """Steps of the period after the static start: up to the next change of the input's period
    structure (its first period boundary), at least one."""
    ends = sorted(e for _, s, e in trial.periods if e > trial.static)
    return max(1, (ends[0] if ends else len(trial.ob)) - trial.static)


def plot_trials(run: Path, out: Path, written: list, save) -> None:
    """Every figure of a trained network in time (see the module docstring)."""
    a = analyse_run(run)
    _psychometric(run, out, written, save)
    _examples(a, out, written, save)
    _trajectories(a, out, written, save)
    _fixed_points(a, out, written, save)


def _psychometric(run: Path, out: Path, written: list, save) -> None:
    path = run / "trials.json"
    if not path.exists():
        return
    records = json.loads(path.read_text())
    if not records or "coh" not in records[0] or "choice" not in records[0]:
        return
    by: dict = defaultdict(lambda: defaultdict(list))
    for r in records:
        by[r.get("context", "")][signed_coherence(r, r["target"])].append(int(r["choice"] == 1))
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for context, levels in sorted(by.items()):
        xs = sorted(levels)
        ax.plot(xs, [sum(levels[x]) / len(levels[x]) for x in xs], "o-", label=f"context {context}")
    ax.set_xlabel("signed coherence of the relevant modality (%)")
    ax.set_ylabel("P(choice 1)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("psychometric curves (test trials)")
    fig.tight_layout()
    save(fig, out, "psychometric", written)


def _examples(a: dict, out: Path, written: list, save, n: int = 3) -> None:
    """Inputs, outputs and targets of ``n`` test trials; output k and its target share colour k."""
    model, batch = a["model"], a["batch"]
    continuous = batch["gt"].is_floating_point()
    outputs = (a["R"][:n] @ model.W_out.T.double() + model.b_out.double()).detach()
    probs = outputs if continuous else torch.softmax(outputs, -1)
    colour = [f"C{k % 10}" for k in range(probs.shape[-1])]
    fig, axes = plt.subplots(3, n, figsize=(4.2 * n, 6.5), sharex="col", squeeze=False)
    for j in range(min(n, len(probs))):
        T = int(batch["mask"][j].sum())
        steps = torch.arange(T).numpy()
        axes[0, j].plot(batch["ob"][j, :T].numpy(), lw=1)
        axes[0, j].axvline(int(batch["static"][j]), color="k", ls=":", lw=1)
        axes[0, j].set_title(f"test trial {int(batch['index'][j])}" + (" (dotted: the static start ends)" if j == 0 else ""),
                             fontsize=9)
        gt = batch["gt"][j, :T]
        for k, c in enumerate(colour):
            name = f"output {k}" if continuous else f"action {k}"
            axes[1, j].plot(steps, probs[j, :T, k].numpy(), color=c, lw=1.2, label=name)
            if continuous:
                axes[2, j].plot(steps, gt[:, k].numpy(), color=c, lw=1.2)
            else:      # the target action as a mark at its own height, in its output's colour
                at = gt == k
                axes[2, j].scatter(steps[at.numpy()], gt[at].numpy(), color=c, s=6)
        if not continuous:
            axes[2, j].set_yticks(range(len(colour)))
        axes[2, j].set_xlabel(f"step ({model.dt:g} ms)")
    axes[0, 0].set_ylabel("inputs")
    axes[1, 0].set_ylabel("outputs" if continuous else "P(action)")
    axes[1, 0].legend(fontsize=7)
    axes[2, 0].set_ylabel("targets" if continuous else "target action")
    fig.tight_layout()
    save(fig, out, "example_trials", written)


def _condition_colours(conds: list, levels: list) -> dict:
    """A colour per condition: along a diverging map by its level where there is one level
    (coherence, a value), else one of a qualitative set (a multi-bit task's 2ᵏ conditions)."""
    if all(len(c[1]) == 1 for c in conds):
        values = sorted({c[1][0] for c in conds})
        cmap = plt.get_cmap("coolwarm")
        return {c: cmap(values.index(c[1][0]) / max(len(values) - 1, 1)) for c in conds}
    cmap = plt.get_cmap("tab10" if len(levels) <= 10 else "tab20")
    return {c: cmap(levels.index(c[1]) % cmap.N) for c in conds}


def _trajectories(a: dict, out: Path, written: list, save) -> None:
    fig, ax = plt.subplots(figsize=(5, 4.2))
    info = a["analysis"]
    conds = sorted(a["conds"], key=lambda c: (str(c[0]), c[1]))
    colours = _condition_colours(conds, sorted({c[1] for c in conds}))
    styles = {ctx: s for ctx, s in zip(sorted({str(c[0]) for c in conds}), ("-", "--", ":", "-."))}
    T = int(a["batch"]["mask"].all(0).sum())        # the steps every trial has
    for cond in conds:
        rows = a["conds"][cond]
        P = (a["R"][rows, :T].mean(0) - a["mean"]) @ a["pcs"][:2].T
        ax.plot(P[:, 0].numpy(), P[:, 1].numpy(), styles[str(cond[0])], color=colours[cond], lw=1.2,
                label=describe(cond[0], cond[1], info["context_name"], info["level_names"])
                if len(conds) <= 12 else None)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("mean state trajectories by condition")
    if len(conds) <= 12:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    save(fig, out, "trajectories_pca", written)


def _fixed_points(a: dict, out: Path, written: list, save) -> None:
    """The fixed points of each condition's constant input on the states' principal components
    (one panel per context; in 3-D when a condition is several numbers), filled where stable, and
    the largest real part of each one's Jacobian eigenvalues by condition."""
    info = a["analysis"]
    conds = info["conditions"]
    key = lambda c: (str(c["context"]), tuple(c["level"]) if isinstance(c["level"], list) else (c["level"],))
    keys = [key(c) for c in conds]
    colours = _condition_colours(keys, sorted({k[1] for k in keys}))
    several = any(len(k[1]) > 1 for k in keys)
    contexts = sorted({k[0] for k in keys})
    panels = 1 if several else len(contexts)
    fig = plt.figure(figsize=(4.6 * (panels + 1), 4.2))
    axes = [fig.add_subplot(1, panels + 1, i + 1, **({"projection": "3d"} if several else {}))
            for i in range(panels)]
    eig_ax = fig.add_subplot(1, panels + 1, panels + 1)
    for i, (c, k) in enumerate(zip(conds, keys)):
        ax = axes[0 if several else contexts.index(k[0])]
        x = i if several else k[1][0]
        for j, p in enumerate(c["fixed_points"]):
            pc = p["pc"][:3] if several else p["pc"][:2]
            ax.scatter(*pc, s=40, color=colours[k] if p["stable"] else "none", edgecolors=colours[k],
                       label=c["label"] if several and j == 0 else None)
            eig_ax.scatter(x, p["max_re_eig"], color=colours[k], marker="o" if p["stable"] else "x")
    for ax, ctx in zip(axes, contexts if not several else [""]):
        where = f", {info['context_name']} {ctx}".rstrip() if ctx != "" else ""
        ax.set_title(f"fixed points{where} (filled: stable)", fontsize=9)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
    if several:
        axes[0].set_zlabel("PC 3")
        axes[0].legend(fontsize=6, loc="upper left", bbox_to_anchor=(0, 1))
        eig_ax.set_xticks(range(len(conds)), [c["label"] for c in conds], rotation=60, ha="right", fontsize=6)
        eig_ax.set_xlabel("condition")
    else:
        eig_ax.set_xlabel(info["level_names"][0])
    eig_ax.axhline(0, color="tab:red", ls="--", lw=1)
    eig_ax.set_ylabel("max Re λ of the Jacobian (1/ms)")
    fig.tight_layout()
    save(fig, out, "fixed_points", written)
