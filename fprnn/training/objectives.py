"""What differs between the problems one training step serves: the objective handed to
[`FixedPointModule`][fprnn.training.module.FixedPointModule].

The step itself (solve → the rule's backward or BPTT → the fault policy → DDP sync → the optimizer)
is written once, in the module. An objective says what a batch is, its per-sample losses and the
share of the global loss each sample carries, its metrics and the run's final numbers:

- [`Static`][fprnn.training.objectives.Static]: an input, one fixed point, a target — classes (or
  maps of classes, a maze's pixels), or values (a read-out's, or the rates of recorded units);
- [`Mazes`][fprnn.training.objectives.Mazes]: ``Static`` on maps of classes, plus the maze report
  (larger mazes, budgets, path independence) at the end;
- [`Trials`][fprnn.training.objectives.Trials]: trials in time ([`fprnn.data.trials`][fprnn.data.trials]), the loss
  at every step weighted, a start at the fixed point of the static input.

A data module names its objective (``objective``, [`fprnn.data.protocol.FixedPointData`][fprnn.data.protocol.FixedPointData]);
[`for_data`][fprnn.training.objectives.for_data] builds it. A new kind of problem is a new subclass
here, registered in ``OBJECTIVES``: the module does not change.
"""
from __future__ import annotations

import resource
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from fprnn.core.checks import non_negative, positive, positive_int
from fprnn.core.implicit import all_finite
from fprnn.models.dense import FixedPoint
from fprnn.training.update import per_sample_loss, solution_fault

Tensor = torch.Tensor
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Penalties:
    """Terms added to each sample's loss under bptt, where a layer reports them (the conv layer):
    ``settle`` μ · mean ‖g(u) − u‖² at the unrolled state u (the answer read from a fixed point,
    not from an iteration still moving); ``stability`` μ_ρ · max(0, ρ̂_i − ``stability_target``)²,
    ρ̂_i the growth of a perturbation along the dominant direction at the fixed point (about
    ρ(G_i W): a fixed point that plain iteration reaches, where it is below 1). 0: off."""
    settle: float = 0.0
    stability: float = 0.0
    stability_target: float = 0.9

    def __post_init__(self):
        non_negative("settle_penalty", self.settle, why="0: off")
        non_negative("stability_penalty", self.stability, why="0: off")
        positive("stability_target", self.stability_target, why="ρ below which the stability penalty is 0")

    def __bool__(self) -> bool:
        return bool(self.settle or self.stability)

    def losses(self, model) -> Tensor | float:
        """Each sample's penalty (with its graph), summed over the layers."""
        out = 0.0
        if self.settle:
            out = out + self.settle * reported(model, "unrolled_residual", "settle_penalty")
        if self.stability:
            growth = reported(model, "local_growth", "stability_penalty")
            out = out + self.stability * F.relu(growth - self.stability_target).pow(2)
        return out


@dataclass
class Outcome:
    """A batch's forward pass, for the step: the outputs, each sample's loss (with its graph), the
    fixed points, the samples whose solve converged (``used``) and those in the loss (``trained``);
    the loss's denominator on this device (the global loss is Σ_trained L_i / Σ_devices
    ``denominator``) and the samples w2's normalisation counts (None: the same); the fault found
    before backward; the bytes autograd saved for backward, where measured."""
    out: Tensor
    losses: Tensor
    fps: list[FixedPoint]
    used: Tensor
    trained: Tensor
    denominator: float
    samples: int | None = None
    fault: str | None = None
    graph_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Objective(nn.Module, ABC):
    """A problem's losses and metrics (an ``nn.Module``: its metrics move with the module to the
    device and reset with Lightning's epochs)."""

    def check(self, options: dict) -> None:
        """Refuse, naming it, a module option that does not apply to this problem."""

    @abstractmethod
    def attach(self, model) -> None:
        """Build the metrics for ``model``'s outputs; refuse a model that cannot serve the problem."""

    @abstractmethod
    def inputs(self, batch) -> Tensor:
        """The batch's inputs (checked for NaN/inf; re-solved by step control)."""

    @abstractmethod
    def forward_step(self, model, batch, *, step: int, unsettled: str, max_nonconverged: float,
                     penalties: Penalties) -> Outcome:
        """Forward through ``model`` at training step ``step``; the per-sample losses and the fault
        found before backward."""

    @abstractmethod
    def log_train(self, module, step, batch, ms: float) -> None:
        """The training step's metrics, through ``module.log``/``log_dict``."""

    @abstractmethod
    def eval_step(self, module, batch, split: str) -> None:
        """A validation or test batch: its metrics, through ``module.log_dict``."""

    @property
    @abstractmethod
    def score(self) -> tuple[str, str]:
        """The validation metric that says which network is best, and its direction."""

    def on_test_epoch_start(self) -> None:
        """Reset what the last test collected."""

    def final(self, run_dir: Path, data, module, trainer, probe_size: int) -> dict[str, Any]:
        """The run's final numbers for results.json."""
        return {}


class Static(Objective):
    """One input, one fixed point per layer, one target: ``task="classification"`` (cross-entropy;
    accuracy, and for maps of classes the whole-map accuracy) or ``"regression"`` (‖ŷ − y‖², on the
    recorded ``units``' rates when given: R² over them)."""

    TASKS = ("classification", "regression")

    def __init__(self, task: str = "classification", units=None):
        super().__init__()
        if task not in self.TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {list(self.TASKS)}")
        self.task = task
        # the recorded units whose rates the loss is on (fitting responses; None: a read-out)
        self.register_buffer("units", None if units is None else torch.as_tensor(units, dtype=torch.long),
                             persistent=False)

    @classmethod
    def from_data(cls, data) -> "Static":
        return cls(data.task, data.units)

    def attach(self, model) -> None:
        if self.task == "classification" and model.n_out is None:
            raise ValueError("classification needs a read-out: set model.n_out to the number of classes")
        for split in SPLITS:
            setattr(self, f"{split}_loss", torchmetrics.MeanMetric())
            setattr(self, f"{split}_max_residual", torchmetrics.MaxMetric())
            if split != "train":    # (a step's unsettled samples are logged as counts)
                setattr(self, f"{split}_settled", torchmetrics.MeanMetric())
            if self.task == "classification":
                setattr(self, f"{split}_acc", torchmetrics.Accuracy("multiclass", num_classes=model.n_out))
                # maps of classes (a maze's pixels): the share of maps with every pixel right, and
                # (held-out splits) the share solved: every pixel right at a fixed point the solve reached
                setattr(self, f"{split}_maze_acc", torchmetrics.MeanMetric())
                if split != "train":
                    setattr(self, f"{split}_solved", torchmetrics.MeanMetric())
            elif self.units is not None:     # pooled over units: 1 − SS_res / SS_tot (variance-weighted)
                setattr(self, f"{split}_r2", torchmetrics.R2Score(len(self.units), multioutput="variance_weighted"))

    @property
    def score(self) -> tuple[str, str]:
        if self.task == "classification":
            return "val/acc", "max"
        return ("val/r2", "max") if self.units is not None else ("val/loss", "min")

    def inputs(self, batch) -> Tensor:
        return batch[0]

    def _cast(self, model, batch) -> tuple[Tensor, Tensor]:
        p, y = batch
        return p.to(model.dtype), (y if self.task == "classification" else y.to(model.dtype))

    def _predict(self, model, p: Tensor) -> Tensor:
        out = model(p)
        return out if self.units is None else out[:, self.units]

    def _train_predict(self, model, p: Tensor, step: int) -> Tensor:
        """The training step's outputs (the same as evaluation's, unless a subclass starts elsewhere)."""
        return self._predict(model, p)

    def forward_step(self, model, batch, *, step, unsettled, max_nonconverged, penalties) -> Outcome:
        p, y = self._cast(model, batch)
        pred = self._train_predict(model, p, step)
        fps = [layer.report.fixed_point for layer in model.layers]
        used = model.used
        trained = torch.ones_like(used) if unsettled == "train" else used
        losses = per_sample_loss(self.task, pred, y)
        if penalties:
            losses = losses + penalties.losses(model)
        fault = "non-finite input" if not all_finite(p) else \
            solution_fault(fps, None if unsettled == "train" else max_nonconverged)
        if fault is None and not all_finite(losses[trained]):
            fault = "non-finite loss"
        return Outcome(pred, losses, fps, used, trained, int(trained.sum()), fault=fault)

    def log_train(self, module, step, batch, ms: float) -> None:
        bs = len(step.losses)
        if torch.isfinite(step.losses).all():
            self.train_loss(step.losses.float().mean())
        logs = {"train/loss": self.train_loss, "train/left_out": float(bs - int(step.trained.sum())),
                "train/unsettled": float(bs - step.n_used)}
        if self.task == "classification":
            logs.update(self._accuracy("train", step.logits, batch[1]))
        module.log_dict(logs, on_step=True, on_epoch=True, prog_bar=False, batch_size=bs,
                        sync_dist=module.world > 1)
        module.log("loss", step.losses.mean(), prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)

    def eval_step(self, module, batch, split: str) -> None:
        model = module.model
        p, y = self._cast(model, batch)
        out = self._predict(model, p)
        fps = [layer.report.fixed_point for layer in model.layers]
        losses = per_sample_loss(self.task, out, y)
        getattr(self, f"{split}_loss")(losses.float())
        logs = {f"{split}/loss": getattr(self, f"{split}_loss")}
        if self.task == "classification":
            logs.update(self._accuracy(split, out, y))
            if out.dim() > 2:
                solved = getattr(self, f"{split}_solved")
                solved(((out.argmax(1) == y).flatten(1).all(1) & model.used).float())
                logs[f"{split}/solved"] = solved
        elif self.units is not None:
            r2 = getattr(self, f"{split}_r2")
            r2(out.float(), y.float())
            logs[f"{split}/r2"] = r2
        mr = getattr(self, f"{split}_max_residual")
        mr(max(fp.solution.residual.max() for fp in fps))
        logs[f"{split}/max_residual"] = mr
        # the share whose answer comes from a fixed point (an unsettled one's from where the solve stopped)
        settled = getattr(self, f"{split}_settled")
        settled(model.used.float())
        logs[f"{split}/settled"] = settled
        module.log_dict(logs, on_step=False, on_epoch=True, prog_bar=(split == "val"), batch_size=len(p))

    def _accuracy(self, split: str, out: Tensor, y: Tensor) -> dict:
        """The split's accuracy (of every pixel, for maps) and, for maps, the whole-map accuracy."""
        pred = out.argmax(1)
        acc = getattr(self, f"{split}_acc")
        acc(pred, y)
        logs = {f"{split}/acc": acc}
        if pred.dim() > 1:
            whole = getattr(self, f"{split}_maze_acc")
            whole((pred == y).flatten(1).all(1).float())
            logs[f"{split}/maze_acc"] = whole
        return logs

    def final(self, run_dir, data, module, trainer, probe_size: int) -> dict[str, Any]:
        """Stability and multistability at a probe batch's fixed points (the worst seen in training
        folded in), the E/I analysis, the linear task's J(W)."""
        from fprnn.analysis.fixed_points import analyse, probe_stability
        from fprnn.training.callbacks import StabilityMonitor, update_peak
        m, out = module.model, {}
        p, _ = data.probe_batch(probe_size)
        out.update(probe_stability(m, p))
        multistable = m.multistable(p.to(module.device)) if all(layer.dyn.continuous for layer in m.layers) else None
        if multistable is not None:
            out["multistable"] = float(multistable.float().mean())
        mon = next((c for c in trainer.callbacks if isinstance(c, StabilityMonitor)), None)
        out.update(update_peak(dict(mon.peak) if mon is not None else {}, out, int(trainer.global_step)))
        if any(layer.sign is not None for layer in m.layers):
            # at the test stimuli's fixed points (up to 256), and a teacher's (data=ssn_teacher) to compare
            x = data.test_set.tensors[0][:256]
            out["analysis"] = analyse(m, x)
            if data.teacher is not None:
                out["teacher_analysis"] = analyse(data.teacher, x)
        J = data.weights_loss(m)     # the linear task's J(W), eq 3.1
        if J is not None:
            out.update(J)
            out["test_loss"] = out["loss_W"]
        return out


def reported(model, what: str, option: str) -> Tensor:
    """Σ over layers of the per-sample quantity ``what`` that each layer's report offers (with its
    graph); a layer that offers none is named, with the option that asked for it."""
    got = [getattr(layer.report, what, None) for layer in model.layers]
    if any(r is None for r in got):
        raise ValueError(f"{option} needs layers that report {what} (ConvFixedPointLayer under bptt); "
                         f"{type(model.layers[0]).__name__} does not: set module.{option}=0")
    return sum(r() for r in got)


class Mazes(Static):
    """``Static`` classification of every pixel of a maze, and at the end the maze report
    ([`fprnn.analysis.mazes.maze_report`][fprnn.analysis.mazes.maze_report]): larger mazes without
    retraining, the budget curve, path independence, the figure.

    ``random_starts``: the share of training mazes solved from a random state (uniform in (−1, 1),
    drawn from a generator seeded by (``seed``, step), so a resumed run draws the same) instead of
    rest; evaluation always starts at rest. ``progressive`` α > 0: each maze's loss is
    (1 − α) L + α L_prog, L_prog the loss after n iterations from rest without a graph and k with one,
    n ~ U{0 … m−1}, k ~ U{1 … m−n}, m = ``progressive_iters`` (Bansal et al. 2022's progressive
    loss, whose maze models train with m = 30; [`MazeNet.progressive`][fprnn.models.maze_net.MazeNet.progressive])."""

    def __init__(self, random_starts: float = 0.0, seed: int = 0, progressive: float = 0.0,
                 progressive_iters: int = 30):
        super().__init__("classification")
        self.random_starts, self.seed, self.progressive = float(random_starts), int(seed), float(progressive)
        self.progressive_iters = positive_int("progressive_iters", progressive_iters)
        self.drawn: tuple[int, int] | None = None      # the last step's progressive (n, k)

    @classmethod
    def from_data(cls, data) -> "Mazes":
        return cls(data.random_starts, data.seed, data.progressive, data.progressive_iters)

    def _generator(self, step: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 4 + stream)

    def forward_step(self, model, batch, *, step, unsettled, max_nonconverged, penalties) -> Outcome:
        o = super().forward_step(model, batch, step=step, unsettled=unsettled, max_nonconverged=max_nonconverged,
                                 penalties=penalties)
        if not self.progressive or o.fault is not None:
            return o
        p, y = self._cast(model, batch)
        m = self.progressive_iters
        gen = self._generator(step, 1)
        n = int(torch.randint(0, m, (), generator=gen))
        k = int(torch.randint(1, m - n + 1, (), generator=gen))
        self.drawn = n, k
        prog = per_sample_loss("classification", model.progressive(p, n, k), y)
        o.losses = (1 - self.progressive) * o.losses + self.progressive * prog
        if not all_finite(o.losses[o.trained]):
            o.fault = "non-finite loss"
        return o

    def _train_predict(self, model, p: Tensor, step: int) -> Tensor:
        if not self.random_starts:
            return model(p)
        gen = self._generator(step, 0)
        B, (H, W) = len(p), p.shape[2:]
        u0 = torch.rand(B, model.layer.channels, H, W, generator=gen, dtype=torch.float64) * 2 - 1
        chosen = torch.rand(B, generator=gen) < self.random_starts
        u0 = torch.where(chosen[:, None, None, None], u0, torch.zeros_like(u0))
        return model(p, u0.to(device=p.device, dtype=model.dtype))

    def final(self, run_dir, data, module, trainer, probe_size: int) -> dict[str, Any]:
        out = super().final(run_dir, data, module, trainer, probe_size)
        if trainer is None or trainer.is_global_zero:
            from fprnn.analysis.mazes import maze_report
            out.update(maze_report(module.model, data, run_dir))
        return out


# -- trials in time ------------------------------------------------------------------------------
def step_losses(out: Tensor, gt: Tensor, weight: Tensor) -> Tensor:
    """Σ_t w_it ℓ_it per trial (B,): ℓ the cross-entropy of step t's action (integer ``gt`` (B, T))
    or the squared error of its outputs averaged over channels (float ``gt`` (B, T, n_out)), w its
    weight (0 on padding, whose outputs then leave no trace)."""
    B, T, A = out.shape
    if gt.is_floating_point():
        ell = ((out - gt.to(out.dtype)) ** 2).mean(-1)
    else:
        ell = F.cross_entropy(out.reshape(B * T, A), gt.reshape(B * T), reduction="none").view(B, T)
    return torch.where(weight > 0, ell * weight, torch.zeros_like(ell)).sum(1)


class WeightedR2(torchmetrics.Metric):
    """R² = 1 − Σ w ‖y − ŷ‖² / Σ w ‖y − ȳ‖² over every step of weight w > 0 and every output
    channel, ȳ the weighted mean of each channel: the share of the targets' variance the outputs
    explain (1: exact; 0: no better than each channel's mean)."""

    def __init__(self, n_out: int):
        super().__init__()
        zero = lambda *shape: torch.zeros(*shape, dtype=torch.float64)     # noqa: E731
        self.add_state("w", default=zero(()), dist_reduce_fx="sum")
        self.add_state("wy", default=zero(n_out), dist_reduce_fx="sum")
        self.add_state("wyy", default=zero(n_out), dist_reduce_fx="sum")
        self.add_state("res", default=zero(()), dist_reduce_fx="sum")

    def update(self, out: Tensor, gt: Tensor, weight: Tensor) -> None:
        w = torch.where(weight > 0, weight, torch.zeros_like(weight)).double().unsqueeze(-1)
        y, yhat = gt.double(), out.double()
        y, yhat = torch.where(w > 0, y, 0.0), torch.where(w > 0, yhat, 0.0)    # padding leaves no trace
        self.w += w.sum()
        self.wy += (w * y).sum((0, 1))
        self.wyy += (w * y * y).sum((0, 1))
        self.res += (w * (y - yhat) ** 2).sum()

    def compute(self) -> Tensor:
        total = (self.wyy - self.wy ** 2 / self.w).sum()
        return 1 - self.res / total


def answers(logits: Tensor, answer: Tensor) -> Tensor:
    """The action each trial chooses at its answer step (B,)."""
    return logits[torch.arange(len(answer), device=logits.device), answer].argmax(-1)


class SavedBytes:
    """Bytes autograd saves for backward while active (the memory a step's graph holds)."""

    def __init__(self):
        self.bytes = 0

    def pack(self, t: Tensor) -> Tensor:
        self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def perf_by_condition(records: list[dict], keys: list[str]) -> dict[str, float]:
    """Performance per condition: the trials grouped by the values of ``keys`` (those they have)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for r in records:
        name = " ".join(f"{k}={r[k]}" for k in keys if k in r) or "all"
        groups[name].append(int(r["choice"] == r["target"]))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


class Trials(Objective):
    """Trials in time for a [`TrialRNN`][fprnn.TrialRNN]. The loss at every step of the trial is the
    cross-entropy of the action (``targets="actions"``) or the squared error averaged over the output
    channels (``"continuous"``), weighted (the decision period ``decision_weight`` times the others,
    or the trials' own mask; padding 0) and normalised by the weights' sum: L = Σ_i Σ_t w_it ℓ_it / Σ w.
    Performance, for actions (NeuroGym's): the action at the answer step (the decision period's last)
    is the ground truth. For continuous targets: the weighted mean squared error and R² over the
    steps of weight > 0 ([`WeightedR2`][fprnn.training.objectives.WeightedR2])."""

    TARGETS = ("actions", "continuous")

    def __init__(self, targets: str = "actions"):
        super().__init__()
        if targets not in self.TARGETS:
            raise ValueError(f"targets must be 'actions' or 'continuous', got {targets!r}")
        self.continuous = targets == "continuous"
        self.test_records: list[dict] = []
        self.start_stats = {"from_rest": 0, "unstable": 0, "graph_mb_max": 0.0, "stability_max": None}

    @classmethod
    def from_data(cls, data) -> "Trials":
        return cls(data.targets)

    def check(self, options: dict) -> None:
        why = {"backtrack": "step control re-solves a static network's batch; a network in time has none "
                            "(set fault.backtrack=0)",
               "max_nonconverged": "does not apply to a network in time: a trial whose start does not converge "
                                   "starts from rest (set fault.max_nonconverged=0)",
               **{name: "does not apply to a network in time (its trials are unrolled in time, not to a "
                        f"fixed point): set module.{name}=0" for name in ("settle_penalty", "stability_penalty")},
               "warmup_steps": "a network in time already takes BPTT's gradient beside its start's rule "
                               "(set module.warmup_steps=0)"}
        for name, reason in why.items():
            if options[name]:
                raise ValueError(f"{name}={options[name]!r}: {reason}")
        if options["unsettled"] != "leave_out":
            raise ValueError(f"unsettled={options['unsettled']!r} does not apply to a network in time: a trial "
                             f"whose start does not converge starts from rest (set fault.unsettled=leave_out)")

    def attach(self, model) -> None:
        for split in SPLITS:
            setattr(self, f"{split}_loss", torchmetrics.MeanMetric())
            setattr(self, f"{split}_r2" if self.continuous else f"{split}_perf",
                    WeightedR2(model.n_out) if self.continuous else torchmetrics.MeanMetric())

    @property
    def metric(self) -> str:
        return "r2" if self.continuous else "perf"

    @property
    def score(self) -> tuple[str, str]:
        return f"val/{self.metric}", "max"

    def inputs(self, batch) -> Tensor:
        return batch["ob"]

    def forward_step(self, model, batch, *, step, unsettled, max_nonconverged, penalties) -> Outcome:
        with SavedBytes() as saved:
            logits = model(batch["ob"], batch["static"])
        losses = step_losses(logits, batch["gt"], batch["weight"])
        rep, B = model.report, len(losses)
        fault = "non-finite input" if not all_finite(batch["ob"]) else None
        if fault is None and not all_finite(losses):
            fault = (f"non-finite loss ({rep.from_rest} trials started from rest after their start did not "
                     f"converge)" if rep.from_rest else "non-finite loss")
        everyone = torch.ones(B, dtype=torch.bool, device=losses.device)
        return Outcome(logits, losses, [] if rep.fixed_point is None else [rep.fixed_point], everyone, everyone,
                       float(batch["weight"].sum()), samples=B, fault=fault, graph_mb=saved.bytes / 2**20)

    def log_train(self, module, step, batch, ms: float) -> None:
        rep, B = module.model.report, len(step.losses)
        self._count_starts(rep, "train")
        self.start_stats["graph_mb_max"] = max(self.start_stats["graph_mb_max"], step.graph_mb)
        logs = {"train/step_ms": ms, "train/graph_mb": step.graph_mb, "train/start_from_rest": float(rep.from_rest),
                "train/start_unstable": float(rep.unstable),
                "train/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if rep.stability_max is not None:
            logs["train/start_stability"] = rep.stability_max
        module.log_dict(logs, on_step=True, on_epoch=False, batch_size=B)
        loss = step.losses.sum() / batch["weight"].sum()
        if torch.isfinite(step.losses).all():
            self.train_loss(loss)
            self._score("train", step.logits, batch)
        module.log_dict({"train/loss": self.train_loss, f"train/{self.metric}": getattr(self, f"train_{self.metric}")},
                        on_step=True, on_epoch=True, batch_size=B, sync_dist=module.world > 1)
        module.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=B)

    def _count_starts(self, rep, split: str) -> None:
        """Adds a call's starts to ``start_stats``: trials from rest (unconverged, unstable) in
        training and testing, and the largest stability value of a start used in any split."""
        if split in ("train", "test"):
            prefix = "" if split == "train" else "test_"
            for key, v in (("from_rest", rep.from_rest), ("unstable", rep.unstable)):
                self.start_stats[prefix + key] = self.start_stats.get(prefix + key, 0) + v
        s, prev = rep.stability_max, self.start_stats["stability_max"]
        if s is not None:
            self.start_stats["stability_max"] = s if prev is None else max(prev, s)

    def _score(self, split: str, out: Tensor, batch) -> tuple[Tensor, Tensor] | None:
        """Updates the split's performance (actions) or R² (continuous targets); for actions
        returns (choice, target) at each trial's answer step."""
        if self.continuous:     # called, not updated: the step's own R² is what train/r2_step logs
            getattr(self, f"{split}_r2")(out, batch["gt"], batch["weight"])
            return None
        answer = batch["answer"]
        choice = answers(out, answer)
        target = batch["gt"][torch.arange(len(answer), device=batch["gt"].device), answer]
        getattr(self, f"{split}_perf")((choice == target).float())
        return choice, target

    def eval_step(self, module, batch, split: str) -> None:
        out = module.model(batch["ob"], batch["static"])
        self._count_starts(module.model.report, split)
        losses = step_losses(out, batch["gt"], batch["weight"])
        getattr(self, f"{split}_loss").update(losses.sum() / batch["weight"].sum(), batch["weight"].sum())
        scored = self._score(split, out, batch)
        module.log_dict({f"{split}/loss": getattr(self, f"{split}_loss"),
                         f"{split}/{self.metric}": getattr(self, f"{split}_{self.metric}")},
                        on_step=False, on_epoch=True, prog_bar=(split == "val"), batch_size=len(losses))
        if split == "test":
            info = module.trainer.datamodule.trial_info("test", batch["index"])
            if scored is None:      # continuous targets: each trial's weighted mean squared error
                w = batch["weight"]
                each = (losses / w.sum(1).clamp_min(torch.finfo(w.dtype).tiny)).tolist()
                self.test_records += [{"trial": int(k), "mse": e, **i} for k, e, i in zip(batch["index"], each, info)]
            else:
                self.test_records += [{"trial": int(k), "choice": int(c), "target": int(g), **i}
                                      for k, c, g, i in zip(batch["index"], *scored, info)]

    def on_test_epoch_start(self) -> None:
        self.test_records = []
        self.start_stats.update(test_from_rest=0, test_unstable=0)     # the last test's own

    def final(self, run_dir, data, module, trainer, probe_size: int) -> dict[str, Any]:
        """How the trials started, the test performance per condition (and every test trial's
        choice in ``trials.json``), E/I sign violations."""
        import json
        from fprnn.core import constraints
        from fprnn.training.checkpoint import atomic_write_text
        m, stats = module.model, self.start_stats
        out: dict[str, Any] = {"start": m.start, "start_from_rest": stats["from_rest"],
                               "start_unstable": stats["unstable"],
                               "test_start_from_rest": stats.get("test_from_rest", 0),
                               "test_start_unstable": stats.get("test_unstable", 0),
                               "graph_mb_max": stats["graph_mb_max"], "start_stability_max": stats["stability_max"],
                               "targets": data.targets,
                               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if self.test_records and not self.continuous:
            out["test_perf_by_condition"] = perf_by_condition(self.test_records, data.condition_keys)
            # chance: always answering the test trials' most frequent target
            targets = [r["target"] for r in self.test_records]
            out["test_chance"] = max(targets.count(t) for t in set(targets)) / len(targets)
        if self.test_records and (trainer is None or trainer.is_global_zero):
            atomic_write_text(run_dir / "trials.json", json.dumps(self.test_records))
        layer = m.layer
        if layer.sign is not None or layer.mask is not None:
            out["constraint_violations"] = constraints.violations(layer.W.detach(), layer.sign, layer.mask)
        return out


#: the objectives a data module may name (its ``objective``)
OBJECTIVES: dict[str, type[Objective]] = {"static": Static, "mazes": Mazes, "trials": Trials}


def for_data(data) -> Objective:
    """The objective ``data`` names, built from what it declares."""
    name = data.objective
    if name not in OBJECTIVES:
        raise ValueError(f"{type(data).__name__}.objective={name!r} is not an objective; choose one of "
                         f"{sorted(OBJECTIVES)}")
    return OBJECTIVES[name].from_data(data)
