"""LightningModule for a network in time ([`fprnn.models.ctrnn.TrialRNN`][fprnn.models.ctrnn.TrialRNN]) on trials
([`fprnn.data.tasks`][fprnn.data.tasks]): forward through the trial → the sequence loss → backward (the start's rule
plus BPTT, [`fprnn.core.implicit`][fprnn.core.implicit] and autograd) → the optimizer's step → constraints.

The loss at every step of the trial is the cross-entropy of the action (action targets) or the
squared error averaged over the output channels (continuous targets), weighted (the decision period
``decision_weight`` times the others, or the trials' own mask; padding 0) and normalised by the
weights' sum: L = Σ_i Σ_t w_it ℓ_it / Σ w. Performance, for actions (NeuroGym's): the action at the
answer step (the decision period's last) is the ground truth. For continuous targets: the weighted
mean squared error and R² over the steps of weight > 0 ([`WeightedR2`][fprnn.training.trial_module.WeightedR2]). Faults, step skipping,
constraints and the run's record are [`fprnn.training.module.FixedPointModule`][fprnn.training.module.FixedPointModule]'s.
"""
from __future__ import annotations

import resource
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
import torchmetrics

from fprnn.training import ddp
from fprnn.models.ctrnn import TrialRNN
from fprnn.core.implicit import all_finite
from fprnn.training.module import FixedPointModule
from fprnn.training.update import Step

Tensor = torch.Tensor


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
        zero = lambda *shape: torch.zeros(*shape, dtype=torch.float64)
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


class TrialModule(FixedPointModule):
    """Trains a [`TrialRNN`][fprnn.TrialRNN]: its start's W by ``rule`` with η = ``eta`` (1: the rule's
    direction at the gradient's scale, which BPTT's part of W.grad has too), everything else by its
    gradient, with any torch optimizer (``lr`` is then the optimizer's, as in its config)."""

    def __init__(self, model: TrialRNN, rule: str = "w3", lr: float = 3e-3, eta: float = 1.0, targets: str = "actions",
                 rule_kwargs: dict | None = None, optimizer=None, scheduler=None, lr_readin: float | None = None,
                 lr_readout: float | None = None, readin: str = "gradient", on_fault: str = "skip",
                 max_faults: int = 10, max_nonconverged: float = 0.0, max_skipped: float = 0.5, backtrack: int = 0,
                 check_every: int = 50, unsettled: str = "leave_out", clip_grad_norm: float | None = None,
                 settle_penalty: float = 0.0):
        if backtrack:
            raise ValueError(f"backtrack={backtrack!r}: step control re-solves a static network's batch; a "
                             f"network in time has none (set fault.backtrack=0)")
        if max_nonconverged:
            raise ValueError(f"max_nonconverged={max_nonconverged!r} does not apply to a network in time: a trial "
                             f"whose start does not converge starts from rest (set fault.max_nonconverged=0)")
        if settle_penalty:
            raise ValueError(f"settle_penalty={settle_penalty!r} does not apply to a network in time (its trials are "
                             f"unrolled in time, not to a fixed point): set module.settle_penalty=0")
        if unsettled != "leave_out":
            raise ValueError(f"unsettled={unsettled!r} does not apply to a network in time: a trial whose start "
                             f"does not converge starts from rest (set fault.unsettled=leave_out)")
        if targets not in ("actions", "continuous"):
            raise ValueError(f"targets must be 'actions' or 'continuous', got {targets!r}")
        # the static module's own metrics: accuracy over classes for actions, none for continuous targets
        super().__init__(model, rule=rule, lr=lr, eta=eta, rule_kwargs=rule_kwargs,
                         task="classification" if targets == "actions" else "regression",
                         optimizer=optimizer, scheduler=scheduler, lr_readin=lr_readin, lr_readout=lr_readout,
                         readin=readin, on_fault=on_fault, max_faults=max_faults, max_skipped=max_skipped,
                         check_every=check_every, clip_grad_norm=clip_grad_norm)
        self.continuous = targets == "continuous"
        for split in ("train", "val", "test"):
            setattr(self, f"{split}_perf" if not self.continuous else f"{split}_r2",
                    torchmetrics.MeanMetric() if not self.continuous else WeightedR2(model.n_out))
        self.test_records: list[dict] = []
        self.start_stats = {"from_rest": 0, "unstable": 0, "graph_mb_max": 0.0, "stability_max": None}

    @property
    def score(self) -> tuple[str, str]:
        """The validation metric that says which network is best, and its direction."""
        return ("val/r2", "max") if self.continuous else ("val/perf", "max")

    # -- the step -----------------------------------------------------------------------
    def compute_update(self, batch: dict) -> Step:
        m = self.model
        m.zero_grad(set_to_none=True)
        weights_before = [layer.W.detach().clone() for layer in m.layers]
        with SavedBytes() as saved:
            logits = m(batch["ob"], batch["static"])
        losses = step_losses(logits, batch["gt"], batch["weight"])
        rep = m.report
        B = len(losses)
        step = Step([] if rep.fixed_point is None else [rep.fixed_point], losses.detach(), logits.detach(),
                    torch.ones(B, dtype=torch.bool, device=losses.device), weights_before)
        step.graph_mb = saved.bytes / 2**20
        fault = "non-finite input" if not all_finite(batch["ob"]) else None
        if fault is None and not all_finite(losses):
            fault = (f"non-finite loss ({rep.from_rest} trials started from rest after their start did not "
                     f"converge)" if rep.from_rest else "non-finite loss")
        step.fault = ddp.sync_fault(self.trainer.strategy, self.world, fault, self.device)
        if step.fault is not None:
            return step
        # DDP averages gradients: each device's loss is its share of the global weighted mean
        total = ddp.global_count(self.trainer.strategy, self.world, float(batch["weight"].sum()), self.device)
        trials = ddp.global_count(self.trainer.strategy, self.world, B, self.device)
        m.set_loss_norm(trials / self.world)
        self.manual_backward(losses.sum() * (self.world / total))
        fault = m.layer.report.fault if rep.fixed_point is not None and m.layer.report is not None else None
        bad = [name for name, t in m.named_parameters() if t.grad is not None and not all_finite(t.grad)]
        step.fault = ddp.sync_fault(self.trainer.strategy, self.world,
                                    fault or (f"non-finite gradient of {', '.join(bad)}" if bad else None), self.device)
        return step

    def training_step(self, batch, batch_idx):
        if self.record.status == "diverged":
            return None
        t0 = time.perf_counter()
        step = self.compute_update(batch)
        if step.fault is None:
            self.apply(step)
        step.skipped = step.fault is not None
        if step.skipped:
            self._fault(step.fault)
        ms = 1e3 * (time.perf_counter() - t0)
        self.record.count_step(ms, step)
        self.last_step = step
        rep, B = self.model.report, len(step.losses)
        self._count_starts(rep, "train")
        self.start_stats["graph_mb_max"] = max(self.start_stats["graph_mb_max"], step.graph_mb)
        logs = {"train/step_ms": ms, "train/graph_mb": step.graph_mb, "train/start_from_rest": float(rep.from_rest),
                "train/start_unstable": float(rep.unstable),
                "train/peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        if rep.stability_max is not None:
            logs["train/start_stability"] = rep.stability_max
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=B)
        loss = step.losses.sum() / batch["weight"].sum()
        if torch.isfinite(step.losses).all():
            self.train_loss(loss)
            self._score("train", step.logits, batch)
        metric = "r2" if self.continuous else "perf"
        self.log_dict({"train/loss": self.train_loss, f"train/{metric}": getattr(self, f"train_{metric}")},
                      on_step=True, on_epoch=True, batch_size=B, sync_dist=self.world > 1)
        self.log("loss", loss, prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=B)
        ddp.check_ranks(self, batch_idx)
        return None

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
        choice, target = answers(out, batch["answer"]), self._answer_gt(batch)
        getattr(self, f"{split}_perf")((choice == target).float())
        return choice, target

    @staticmethod
    def _answer_gt(batch) -> Tensor:
        return batch["gt"][torch.arange(len(batch["answer"]), device=batch["gt"].device), batch["answer"]]

    # -- evaluation -------------------------------------------------------------------
    def _eval_step(self, batch, split: str):
        out = self.model(batch["ob"], batch["static"])
        self._count_starts(self.model.report, split)
        losses = step_losses(out, batch["gt"], batch["weight"])
        getattr(self, f"{split}_loss").update(losses.sum() / batch["weight"].sum(), batch["weight"].sum())
        scored = self._score(split, out, batch)
        metric = "r2" if self.continuous else "perf"
        self.log_dict({f"{split}/loss": getattr(self, f"{split}_loss"), f"{split}/{metric}": getattr(self, f"{split}_{metric}")},
                      on_step=False, on_epoch=True, prog_bar=(split == "val"), batch_size=len(losses))
        if split == "test":
            info = self.trainer.datamodule.trial_info("test", batch["index"])
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


def perf_by_condition(records: list[dict], keys: list[str]) -> dict[str, float]:
    """Performance per condition: the trials grouped by the values of ``keys`` (those they have)."""
    groups: dict[str, list[int]] = defaultdict(list)
    for r in records:
        name = " ".join(f"{k}={r[k]}" for k in keys if k in r) or "all"
        groups[name].append(int(r["choice"] == r["target"]))
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}
