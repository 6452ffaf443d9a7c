"""LightningModule: forward to the fixed points → loss → backward (each W gets its rule's −ΔW,
fprnn.core.implicit) → a torch optimizer's step → constraints, with faults and step control."""
from __future__ import annotations

import dataclasses
import math
import time
from functools import partial
from typing import Callable

import pytorch_lightning as pl
import torch
import torchmetrics

from fprnn.core import constraints, rules
from fprnn.core.checks import positive_int

from fprnn.training import ddp
from fprnn.core.implicit import all_finite
from fprnn.models.dense import FixedPointRNN
from fprnn.training.update import RunRecord, Step, backtrack, per_sample_loss, solution_fault

Tensor = torch.Tensor
ALL_RULES = sorted([*rules.RULES, "bptt"])
TASKS = ("classification", "regression")
#: what a step does with samples whose solve did not settle (missed the solver's tolerance)
UNSETTLED = ("leave_out", "train")


def _check_options(model, rule, lr, lr_readin, lr_readout, task, on_fault, max_faults, max_skipped,
                   backtrack, unsettled, clip_grad_norm, settle_penalty) -> None:
    """FixedPointModule's arguments, each bad one named with what is allowed."""
    if rule not in ALL_RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {ALL_RULES}")
    for name, v, optional in (("lr", lr, False), ("lr_readin", lr_readin, True),
                              ("lr_readout", lr_readout, True)):
        if not (optional and v is None) and (isinstance(v, bool) or not isinstance(v, (int, float))
                                             or not math.isfinite(v) or v <= 0):
            raise ValueError(f"{name} must be a positive finite number{' or null' if optional else ''}, "
                             f"got {v!r}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
    if on_fault not in ("skip", "stop"):
        raise ValueError(f"on_fault must be 'skip' or 'stop', got {on_fault!r}")
    positive_int("max_faults", max_faults)
    if isinstance(max_skipped, bool) or not isinstance(max_skipped, (int, float)) \
            or not 0 <= max_skipped < 1:
        raise ValueError(f"max_skipped must be a fraction in [0, 1), got {max_skipped!r}")
    if isinstance(backtrack, bool) or not isinstance(backtrack, int) or backtrack < 0:
        raise ValueError(f"backtrack must be a count of halvings ≥ 0 (0 = off), got {backtrack!r}")
    if unsettled not in UNSETTLED:
        raise ValueError(f"unsettled must be one of {list(UNSETTLED)}, got {unsettled!r}")
    if unsettled == "train" and rule != "bptt":
        raise ValueError(f"unsettled='train' needs rule=bptt, got rule={rule!r}: {rule}'s step is derived at a "
                         f"fixed point, and an unsettled sample has none (use unsettled='leave_out')")
    if clip_grad_norm is not None and (isinstance(clip_grad_norm, bool) or not isinstance(clip_grad_norm, (int, float))
                                       or not math.isfinite(clip_grad_norm) or clip_grad_norm <= 0):
        raise ValueError(f"clip_grad_norm must be a positive finite number or null (off), got {clip_grad_norm!r}")
    if isinstance(settle_penalty, bool) or not isinstance(settle_penalty, (int, float)) \
            or not math.isfinite(settle_penalty) or settle_penalty < 0:
        raise ValueError(f"settle_penalty must be a non-negative finite number (0: off), got {settle_penalty!r}")
    if settle_penalty and rule != "bptt":
        raise ValueError(f"settle_penalty={settle_penalty!r} needs rule=bptt (it penalizes the unrolled state's "
                         f"distance from a fixed point), got rule={rule!r}")
    if not any(True for _ in model.parameters()):
        raise ValueError("nothing to train: model.train_W, train_readin and train_readout are all false")
    if task == "classification" and model.W_out is None:
        raise ValueError("classification needs a read-out: set model.n_out to the number of classes")


class FixedPointModule(pl.LightningModule):
    """Trains a stack of fixed-point layers (`FixedPointRNN`): every W_ℓ by a rule from
    [`fprnn.core.rules`][fprnn.core.rules] (or ``bptt``), trained read-ins and read-outs by their gradient.

    Each step solves the batch's fixed points, takes the loss (mean over the samples used) and
    calls backward, whose rule hands the optimizer −ΔW as each W's gradient ([`fprnn.core.implicit`][fprnn.core.implicit]):
    plain SGD with lr = 1 (the default) makes W ← W + ΔW exactly, as in the paper; momentum or
    Adam then act on the rule's direction; ``scheduler`` (a torch LR scheduler factory) is stepped
    at each epoch end. Read-in (V_ℓ, b_ℓ) and read-out (W_out, b_out) tensors
    are their own parameter groups, with learning rates ``lr_readin`` / ``lr_readout`` (default:
    the optimizer's). ``readin="reparam"`` (default) moves read-ins by the reparameterized step,
    ``"gradient"`` by their gradient (docs/concepts/stacks.md). ``eta``: the rules' η when it is not ``lr``
    (a network in time, whose W also takes BPTT's gradient, gives its rule η = 1).

    Faults — fixed points that did not converge (more than ``max_nonconverged`` of the batch, for
    solvers with a tolerance; fewer are left out of the update and counted), NaN/inf in r, the
    loss or an update, w2 leaving its domain — never reach the weights. With ``on_fault="skip"``
    the step is skipped and counted; ``max_faults`` consecutive faults end training with status
    "diverged". ``on_fault="stop"`` ends it at the first fault. A run that skipped more than
    ``max_skipped`` of its steps (all of them, say, when no fixed point converges at the start)
    has not trained: it ends with status "no_progress".

    ``unsettled="train"`` (rule=bptt only) keeps unsettled samples in the loss instead: BPTT's
    gradient is the exact gradient of the unrolled iteration that produced the output, settled or
    not — which is how a network whose solves do not settle at the start (mazes, docs/results.md)
    learns until they do. They are counted (``train/unsettled``), not faults. ``clip_grad_norm``
    scales the step's gradients (the rules' −ΔW included) to that total norm at most before the
    optimizer's step (Lightning's ``clip_gradients``; the trainer's own clipping does not run under
    manual optimization). ``settle_penalty`` μ > 0 (bptt, layers that report it: the conv layer)
    adds μ · mean ‖g(u) − u‖² at the unrolled state u to each sample's loss, so that the answer the
    network learns to give is read from a fixed point rather than from an iteration still moving.
    """

    def __init__(self, model: FixedPointRNN, rule: str = "w3", lr: float = 0.25, task: str = "classification",
                 rule_kwargs: dict | None = None, optimizer: Callable | None = None,
                 scheduler: Callable | None = None, lr_readin: float | None = None,
                 lr_readout: float | None = None, readin: str = "reparam",
                 units=None, on_fault: str = "skip", max_faults: int = 10, max_nonconverged: float = 0.0,
                 max_skipped: float = 0.5, backtrack: int = 0, check_every: int = 50, eta: float | None = None,
                 unsettled: str = "leave_out", clip_grad_norm: float | None = None, settle_penalty: float = 0.0):
        super().__init__()
        _check_options(model, rule, lr, lr_readin, lr_readout, task, on_fault, max_faults, max_skipped,
                       backtrack, unsettled, clip_grad_norm, settle_penalty)
        self.automatic_optimization = False
        self.model, self.rule_name, self.lr, self.task = model, rule, float(lr), task
        self.lr_readin, self.lr_readout, self.readin = lr_readin, lr_readout, readin
        # faults are recorded, not raised, in backward: with several devices a raise there would
        # leave the other ranks waiting in their all-reduce
        model.set_backward(rule, lr if eta is None else eta, rule_kwargs, readin=readin, on_fault="record")
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.on_fault, self.max_faults, self.max_nonconverged = on_fault, max_faults, max_nonconverged
        self.max_skipped, self.backtrack = float(max_skipped), backtrack
        self.unsettled, self.clip_grad_norm, self.settle_penalty = unsettled, clip_grad_norm, float(settle_penalty)
        # the recorded units whose rates the loss is on (fitting responses; None: a read-out)
        self.register_buffer("units", None if units is None else torch.as_tensor(units, dtype=torch.long),
                             persistent=False)
        self.check_every = int(check_every)   # steps between rank-agreement checks (and each epoch)
        # the loggers get the whole run config from fprnn.training.run, not these few keys
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"], logger=False)
        for split in ("train", "val", "test"):
            setattr(self, f"{split}_loss", torchmetrics.MeanMetric())
            setattr(self, f"{split}_max_residual", torchmetrics.MaxMetric())
            if split != "train":    # (a step's unsettled samples are logged as counts)
                setattr(self, f"{split}_settled", torchmetrics.MeanMetric())
            if task == "classification":
                setattr(self, f"{split}_acc", torchmetrics.Accuracy("multiclass", num_classes=model.n_out))
                # maps of classes (a maze's pixels): the share of maps with every pixel right
                setattr(self, f"{split}_maze_acc", torchmetrics.MeanMetric())
            elif units is not None:     # pooled over units: 1 − SS_res / SS_tot (variance-weighted)
                setattr(self, f"{split}_r2", torchmetrics.R2Score(len(self.units), multioutput="variance_weighted"))
        self.record = RunRecord()
        self.last_step: Step | None = None

    # -- optimizer --------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        """W's (the rules' −ΔW, the optimizer's lr), read-ins, read-outs: the non-empty ones."""
        m = self.model
        groups = [({"params": [layer.W for layer in m.layers if isinstance(layer.W, torch.nn.Parameter)]}, None),
                  ({"params": m.readins()}, self.lr_readin),
                  ({"params": [t for _, t in m.named_readouts()]}, self.lr_readout)]
        return [dict(g, lr=lr) if lr is not None else g for g, lr in groups if g["params"]]

    def configure_optimizers(self):
        factory = self.optimizer_factory or partial(torch.optim.SGD, lr=1.0)
        opt = factory(self.param_groups())
        if self.scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler_factory(opt), "interval": "epoch"}}

    def on_train_epoch_end(self) -> None:
        sched = self.lr_schedulers()       # manual optimization: Lightning leaves the stepping to us
        if sched is not None:
            sched.step()

    # -- the step ---------------------------------------------------------------------
    def _fault(self, what: str) -> None:
        if self.record.fault(f"step {self.global_step}: {what}", self.on_fault == "stop", self.max_faults):
            self.trainer.should_stop = True
        self.log("train/faults", float(self.record.faults), on_step=True)

    def _cast(self, p: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        dt = self.model.dtype
        return p.to(dt), (y if self.task == "classification" else y.to(dt))

    @property
    def layer_kwargs(self) -> list[dict]:
        """Each layer's rule options as its backward uses them (w2's ``shared_gain`` resolved)."""
        return [layer.backward_rule.rule_kwargs for layer in self.model.layers]

    @property
    def _gathers(self) -> bool:
        """eq 3.8 (w2 with shared gains) is one exact step of the *global* batch mean: with several
        devices its rank-m factors are gathered rather than its result averaged."""
        return self.world > 1 and any(kw.get("shared_gain") for kw in self.layer_kwargs)

    def on_train_start(self) -> None:
        if self._gathers:
            gather = lambda t: self.all_gather(t).flatten(0, 1)    # noqa: E731
            for layer in self.model.layers:
                layer.backward_rule.gather, layer.backward_rule.world = gather, self.world

    def compute_update(self, p: Tensor, y: Tensor) -> Step:
        """Forward, loss and backward: every trained tensor's ``.grad`` (DDP-averaged, weighted by
        the samples each device used), without touching the weights. Every device calls backward
        or none does (a fault on one skips it everywhere)."""
        p, y = self._cast(p, y)
        self.model.zero_grad(set_to_none=True)
        weights_before = [layer.W.detach().clone() for layer in self.model.layers]
        out = self.model(p)
        pred = out if self.units is None else out[:, self.units]
        fps = [layer.report.fixed_point for layer in self.model.layers]
        used = self.model.used
        trained = torch.ones_like(used) if self.unsettled == "train" else used
        losses = per_sample_loss(self.task, pred, y)
        if self.settle_penalty:
            losses = losses + self.settle_penalty * self._unrolled_residual()
        step = Step(fps, losses.detach(), pred.detach(), used, weights_before, trained=trained)
        fault = "non-finite input" if not all_finite(p) else \
            solution_fault(fps, None if self.unsettled == "train" else self.max_nonconverged)
        if fault is None and not all_finite(losses[trained]):
            fault = "non-finite loss"
        step.fault = ddp.sync_fault(self.trainer.strategy, self.world, fault, self.device)
        if step.fault is not None:
            return step
        # DDP averages gradients over devices: each device's loss is its share of the global mean
        n = ddp.global_count(self.trainer.strategy, self.world, int(trained.sum()), self.device)
        self.model.set_loss_norm(n / self.world)
        self.manual_backward(losses[trained].sum() * (self.world / n))
        step.deltas = [None if layer.report.delta is None else layer.report.delta[used] for layer in self.model.layers]
        fault = next((layer.report.fault for layer in reversed(self.model.layers) if layer.report.fault), None)
        bad = [name for name, t in self.model.named_parameters() if t.grad is not None and not all_finite(t.grad)]
        step.fault = ddp.sync_fault(self.trainer.strategy, self.world,
                                    fault or (f"non-finite gradient of {', '.join(bad)}" if bad else None), self.device)
        return step

    def _unrolled_residual(self) -> Tensor:
        """Σ over layers of each sample's mean ‖g(u) − u‖² at its unrolled state (with its graph)."""
        res = [layer.report.unrolled_residual for layer in self.model.layers]
        if any(r is None for r in res):
            raise ValueError(f"settle_penalty needs layers that report their unrolled state's residual "
                             f"(ConvFixedPointLayer under bptt); {type(self.model.layers[0]).__name__} does not: "
                             f"set module.settle_penalty=0")
        return sum(r() for r in res)

    def on_train_batch_start(self, batch, batch_idx):
        # Ctrl-C is turned into a flag by run.py and raised here, between steps, so that the
        # checkpoint saved on the way out holds a consistent state (W, step and data position)
        if getattr(self, "interrupt_requested", False):
            raise KeyboardInterrupt

    def training_step(self, batch, batch_idx):
        if self.record.status == "diverged":
            return None
        t0 = time.perf_counter()
        step = self.compute_update(*batch)
        fault = step.fault
        if fault is None and self.backtrack:
            fault, halvings = backtrack(self.model, batch[0], lambda: self.apply(step), self.backtrack,
                                        self.max_nonconverged)
            self.record.backtracks += halvings
        elif fault is None:
            self.apply(step)
        step.skipped = fault is not None
        if fault is not None:
            self._fault(fault)
        self.record.count_step(1e3 * (time.perf_counter() - t0), step)
        self.last_step = step           # for the monitors (fprnn.training.callbacks)
        bs = len(step.losses)
        if torch.isfinite(step.losses).all():
            self.train_loss(step.losses.float().mean())
        logs = {"train/loss": self.train_loss, "train/left_out": float(bs - int(step.trained.sum())),
                "train/unsettled": float(bs - step.n_used)}
        if self.task == "classification":
            logs.update(self._accuracy("train", step.logits, batch[1]))
        self.log_dict(logs, on_step=True, on_epoch=True, prog_bar=False, batch_size=bs,
                      sync_dist=self.world > 1)
        self.log("loss", step.losses.mean(), prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        if any(layer.constrained for layer in self.model.layers):
            self.log("train/clipped", float(self.record.clipped), on_step=True, on_epoch=False, batch_size=bs)
        if self.backtrack:
            self.log("train/backtracks", float(self.record.backtracks), on_step=True, on_epoch=False, batch_size=bs)
        ddp.check_ranks(self, batch_idx)
        return None

    def apply(self, step: Step) -> None:
        """The optimizer's step on the gradients backward left (no momentum off a W's mask; their
        total norm clipped to ``clip_grad_norm``); then every constrained W back on its
        constraints (fprnn.core.constraints)."""
        layers = self.model.layers
        for layer in layers:
            if layer.mask is not None and layer.W.grad is not None:
                layer.W.grad.mul_(layer.mask)
        opt = self.optimizers()
        if self.clip_grad_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=self.clip_grad_norm, gradient_clip_algorithm="norm")
        opt.step()
        with torch.no_grad():
            for l, layer in enumerate(layers):
                if layer.constrained and isinstance(layer.W, torch.nn.Parameter):
                    W, n = constraints.constrain(step.weights_before[l], layer.W, layer.sign, layer.mask,
                                                 layer.constraint)
                    layer.W.copy_(W)
                    self.record.clipped += n

    # -- multi-device ------------------------------------------------------------------
    @property
    def world(self) -> int:
        t = self._trainer
        return t.world_size if t is not None else 1

    # -- evaluation -------------------------------------------------------------------
    def _eval_step(self, batch, split: str):
        p, y = self._cast(*batch)
        out = self.model(p)
        out = out if self.units is None else out[:, self.units]
        fps = [layer.report.fixed_point for layer in self.model.layers]
        losses = per_sample_loss(self.task, out, y)
        getattr(self, f"{split}_loss")(losses.float())
        logs = {f"{split}/loss": getattr(self, f"{split}_loss")}
        if self.task == "classification":
            logs.update(self._accuracy(split, out, y))
        elif self.units is not None:
            r2 = getattr(self, f"{split}_r2")
            r2(out.float(), y.float())
            logs[f"{split}/r2"] = r2
        mr = getattr(self, f"{split}_max_residual")
        mr(max(fp.solution.residual.max() for fp in fps))
        logs[f"{split}/max_residual"] = mr
        # the share whose answer comes from a fixed point (an unsettled one's from where the solve stopped)
        settled = getattr(self, f"{split}_settled")
        settled(self.model.used.float())
        logs[f"{split}/settled"] = settled
        self.log_dict(logs, on_step=False, on_epoch=True, prog_bar=(split == "val"), batch_size=len(p))

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

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_train_end(self) -> None:
        self.record.close(self.max_skipped)

    # -- checkpoint state -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fprnn"] = dataclasses.asdict(self.record)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.record = RunRecord(**checkpoint.get("fprnn", {}))
