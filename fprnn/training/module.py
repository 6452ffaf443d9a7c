"""LightningModule: forward to the fixed points → loss → backward (each W gets its rule's −ΔW,
fprnn.core.implicit) → a torch optimizer's step → constraints, with faults and step control."""
from __future__ import annotations

import dataclasses
import time
from functools import partial
from typing import Callable

import pytorch_lightning as pl
import torch

from fprnn.core import constraints, rules
from fprnn.core.checks import count, positive, positive_int

from fprnn.core.implicit import all_finite
from fprnn.training import ddp
from fprnn.training.objectives import Objective, Penalties, Static
from fprnn.training.update import RunRecord, Step, backtrack

Tensor = torch.Tensor
ALL_RULES = sorted([*rules.RULES, "bptt"])
#: what a step does with samples whose solve did not settle (missed the solver's tolerance)
UNSETTLED = ("leave_out", "train")


def _check_options(model, rule, lr, lr_readin, lr_readout, on_fault, max_faults, max_skipped,
                   backtrack, unsettled, clip_grad_norm, penalties) -> None:
    """FixedPointModule's arguments, each bad one named with what is allowed."""
    if rule not in ALL_RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {ALL_RULES}")
    positive("lr", lr)
    positive("lr_readin", lr_readin, allow_none=True)
    positive("lr_readout", lr_readout, allow_none=True)
    if on_fault not in ("skip", "stop"):
        raise ValueError(f"on_fault must be 'skip' or 'stop', got {on_fault!r}")
    positive_int("max_faults", max_faults)
    if isinstance(max_skipped, bool) or not isinstance(max_skipped, (int, float)) \
            or not 0 <= max_skipped < 1:
        raise ValueError(f"max_skipped must be a fraction in [0, 1), got {max_skipped!r}")
    count("backtrack", backtrack, why="halvings, 0 = off")
    if unsettled not in UNSETTLED:
        raise ValueError(f"unsettled must be one of {list(UNSETTLED)}, got {unsettled!r}")
    if unsettled == "train" and rule != "bptt":
        raise ValueError(f"unsettled='train' needs rule=bptt, got rule={rule!r}: {rule}'s step is derived at a "
                         f"fixed point, and an unsettled sample has none (use unsettled='leave_out')")
    positive("clip_grad_norm", clip_grad_norm, allow_none=True, why="null: off")
    for name, value, what in (("settle_penalty", penalties.settle, "the unrolled state's distance from a fixed point"),
                              ("stability_penalty", penalties.stability, "the fixed point's local growth through K")):
        if value and rule != "bptt":
            raise ValueError(f"{name}={value!r} needs rule=bptt (it penalizes {what}, by autograd), got rule={rule!r}")
    if not any(True for _ in model.parameters()):
        raise ValueError("nothing to train: model.train_W, train_readin and train_readout are all false")


def _check_warmup(rule: str, warmup_steps, warmup_lr, rule_lr_scale) -> None:
    count("warmup_steps", warmup_steps, why="BPTT steps before the rule, 0 = none")
    if warmup_steps and rule == "bptt":
        raise ValueError(f"warmup_steps={warmup_steps} is a BPTT warm-up before a rule; rule=bptt has nothing to "
                         f"warm up to (set module.warmup_steps=0, or a rule: w3, w1, jfb, …)")
    positive("warmup_lr", warmup_lr, why="the warm-up's BPTT η")
    positive("rule_lr_scale", rule_lr_scale, why="W's optimizer lr is multiplied by it at the warm-up's end")
    if rule_lr_scale != 1 and not warmup_steps:
        raise ValueError(f"rule_lr_scale={rule_lr_scale} scales W's optimizer lr at the end of a warm-up, and "
                         f"warmup_steps=0 has none (set module.warmup_steps, or rule_lr_scale=1)")


class FixedPointModule(pl.LightningModule):
    """Trains a fixed-point network — a stack ([`FixedPointRNN`][fprnn.models.dense.FixedPointRNN]), a conv net, a
    network in time ([`TrialRNN`][fprnn.TrialRNN]) — on the problem its ``objective`` describes
    ([`fprnn.training.objectives`][fprnn.training.objectives]; default: classification of static inputs): every W_ℓ by a
    rule from [`fprnn.core.rules`][fprnn.core.rules] (or ``bptt``), everything else by its gradient.

    Each step solves the batch's fixed points, takes the objective's loss and calls backward, whose
    rule hands the optimizer −ΔW as each W's gradient ([`fprnn.core.implicit`][fprnn.core.implicit]):
    plain SGD with lr = 1 (the default) makes W ← W + ΔW exactly, as in the paper; momentum or
    Adam then act on the rule's direction; ``scheduler`` (a torch LR scheduler factory) is stepped
    at each epoch end. Read-in (V_ℓ, b_ℓ) and read-out (W_out, b_out) tensors
    are their own parameter groups, with learning rates ``lr_readin`` / ``lr_readout`` (default:
    the optimizer's). ``readin="reparam"`` (default) moves read-ins by the reparameterized step,
    ``"gradient"`` by their gradient (docs/concepts/stacks.md). ``lr`` is the rule's η, and only that:
    the optimizer's own step is its ``lr`` (a factory's argument, ``optimizer.lr`` in the config).
    Under bptt, η scales K's gradient (1: autograd's); a network in time, whose W also takes BPTT's
    gradient, is given η = 1 by its presets.

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
    network learns to give is read from a fixed point rather than from an iteration still moving;
    ``stability_penalty`` μ_ρ > 0 adds μ_ρ · max(0, ρ̂_i − ``stability_target``)², ρ̂_i about
    ρ(G_i W) at the fixed point ([`Penalties`][fprnn.training.objectives.Penalties]).
    ``warmup_steps`` k > 0 (a rule other than bptt): the first k steps are BPTT's, with η
    ``warmup_lr`` and the unsettled samples trained on as ``unsettled="train"`` does; from step k on,
    the ``rule`` (its mazes must settle: the unsettled are left out) — IT-Net's schedule (Knutson et
    al. 2024: BPTT first, then the implicit backward), so that the rule starts from a network whose
    solves settle. A resumed run takes up the phase of its step. ``rule_lr_scale``: at step k, W's
    optimizer lr is multiplied by it, once (the cosine schedule scales the current lr, so it goes on
    from there; a schedule that resets the lr from its base would undo it) — with Adam the rule's η
    sets no step size, and a fixed point that BPTT's steps found may be held only by smaller ones.
    An objective refuses the options that do not apply to its problem (a network in time: step
    control, ``max_nonconverged``, ``unsettled``, the penalties, a warm-up).
    """

    def __init__(self, model, objective: Objective | None = None, rule: str = "w3", lr: float = 0.25,
                 rule_kwargs: dict | None = None, optimizer: Callable | None = None,
                 scheduler: Callable | None = None, lr_readin: float | None = None,
                 lr_readout: float | None = None, readin: str = "reparam",
                 on_fault: str = "skip", max_faults: int = 10, max_nonconverged: float = 0.0,
                 max_skipped: float = 0.5, backtrack: int = 0, check_every: int = 50,
                 unsettled: str = "leave_out", clip_grad_norm: float | None = None, settle_penalty: float = 0.0,
                 stability_penalty: float = 0.0, stability_target: float = 0.9, warmup_steps: int = 0,
                 warmup_lr: float = 1.0, rule_lr_scale: float = 1.0):
        super().__init__()
        objective = Static() if objective is None else objective
        if not isinstance(objective, Objective):
            raise ValueError(f"objective must be an fprnn.training.objectives.Objective, got {objective!r}")
        penalties = Penalties(settle_penalty, stability_penalty, stability_target)
        _check_options(model, rule, lr, lr_readin, lr_readout, on_fault, max_faults, max_skipped,
                       backtrack, unsettled, clip_grad_norm, penalties)
        _check_warmup(rule, warmup_steps, warmup_lr, rule_lr_scale)
        objective.check(dict(backtrack=backtrack, max_nonconverged=max_nonconverged, settle_penalty=settle_penalty,
                             stability_penalty=stability_penalty, unsettled=unsettled, warmup_steps=warmup_steps))
        objective.attach(model)
        self.automatic_optimization = False
        self.model, self.objective, self.rule_name, self.lr = model, objective, rule, float(lr)
        self.lr_readin, self.lr_readout, self.readin = lr_readin, lr_readout, readin
        self.rule_kwargs, self.warmup_steps, self.warmup_lr = rule_kwargs, warmup_steps, float(warmup_lr)
        self.rule_lr_scale = float(rule_lr_scale)
        self.phase = None
        self.set_phase(self.phase_at(0))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.on_fault, self.max_faults, self.max_nonconverged = on_fault, max_faults, max_nonconverged
        self.max_skipped, self.backtrack = float(max_skipped), backtrack
        self.unsettled, self.clip_grad_norm, self.penalties = unsettled, clip_grad_norm, penalties
        self.check_every = int(check_every)   # steps between rank-agreement checks (and each epoch)
        self.interrupt_requested = False      # set by fprnn.training.run's Ctrl-C handler
        self.fit_metrics: dict = {}           # the metrics at the end of fit (fprnn.training.run)
        # the loggers get the whole run config from fprnn.training.run, not these few keys
        self.save_hyperparameters(ignore=["model", "objective", "optimizer", "scheduler"], logger=False)
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

    def phase_at(self, step: int) -> str:
        """``warmup`` (BPTT) before ``warmup_steps``, then ``rule``."""
        return "warmup" if step < self.warmup_steps else "rule"

    def set_phase(self, phase: str) -> None:
        """Give every layer the backward of ``phase``; faults are recorded, not raised, in backward:
        with several devices a raise there would leave the other ranks waiting in their all-reduce."""
        if phase == self.phase:
            return
        if phase == "warmup":
            self.model.set_backward("bptt", self.warmup_lr, None, readin=self.readin, throw=False)
        else:
            self.model.set_backward(self.rule_name, self.lr, self.rule_kwargs, readin=self.readin, throw=False)
        self.phase = phase

    @property
    def step_unsettled(self) -> str:
        """What this step does with unsettled samples: the warm-up's BPTT trains on them."""
        return "train" if self.phase == "warmup" else self.unsettled

    def compute_update(self, batch) -> Step:
        """Forward, loss and backward: every trained tensor's ``.grad`` (DDP-averaged, weighted by
        the loss each device's samples carry), without touching the weights. Every device calls
        backward or none does (a fault on one skips it everywhere)."""
        model, strategy = self.model, self.trainer.strategy
        model.zero_grad(set_to_none=True)
        weights_before = [layer.W.detach().clone() for layer in model.layers]
        if self.phase == "warmup" and self.global_step == self.warmup_steps and self.rule_lr_scale != 1:
            recurrent = {id(layer.W) for layer in model.layers}
            for group in self.optimizers().param_groups:
                if any(id(p) in recurrent for p in group["params"]):
                    group["lr"] *= self.rule_lr_scale
        self.set_phase(self.phase_at(self.global_step))
        o = self.objective.forward_step(model, batch, step=self.global_step, unsettled=self.step_unsettled,
                                        max_nonconverged=self.max_nonconverged, penalties=self.penalties)
        step = Step(o.fps, o.losses.detach(), o.out.detach(), o.used, weights_before, trained=o.trained)
        step.graph_mb = o.graph_mb
        step.fault = ddp.sync_fault(strategy, self.world, o.fault, self.device)
        if step.fault is not None:
            return step
        # DDP averages gradients over devices: each device's loss is its share of the global mean
        n = ddp.global_count(strategy, self.world, o.denominator, self.device)
        samples = n if o.samples is None else ddp.global_count(strategy, self.world, o.samples, self.device)
        model.set_loss_norm(samples / self.world)
        self.manual_backward(o.losses[o.trained].sum() * (self.world / n))
        if step.fps:
            step.deltas = [None if layer.report.delta is None else layer.report.delta[o.used]
                           for layer in model.layers]
        fault = next((layer.report.fault for layer in reversed(model.layers) if layer.report.fault), None) \
            if step.fps else None
        bad = [name for name, t in model.named_parameters() if t.grad is not None and not all_finite(t.grad)]
        step.fault = ddp.sync_fault(strategy, self.world,
                                    fault or (f"non-finite gradient of {', '.join(bad)}" if bad else None), self.device)
        return step

    def on_train_batch_start(self, batch, batch_idx):
        # Ctrl-C is turned into a flag by run.py and raised here, between steps, so that the
        # checkpoint saved on the way out holds a consistent state (W, step and data position)
        if self.interrupt_requested:
            raise KeyboardInterrupt

    def training_step(self, batch, batch_idx):
        if self.record.status == "diverged":
            return None
        t0 = time.perf_counter()
        step = self.compute_update(batch)
        fault = step.fault
        if fault is None and self.backtrack:
            fault, halvings = backtrack(self.model, self.objective.inputs(batch), lambda: self.apply(step),
                                        self.backtrack, self.max_nonconverged)
            self.record.backtracks += halvings
        elif fault is None:
            self.apply(step)
        step.skipped = fault is not None
        if fault is not None:
            self._fault(fault)
        ms = 1e3 * (time.perf_counter() - t0)
        self.record.count_step(ms, step)
        self.last_step = step           # for the monitors (fprnn.training.callbacks)
        self.objective.log_train(self, step, batch, ms)
        bs = len(step.losses)
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
    def validation_step(self, batch, batch_idx):
        self.objective.eval_step(self, batch, "val")

    def test_step(self, batch, batch_idx):
        self.objective.eval_step(self, batch, "test")

    def on_test_epoch_start(self) -> None:
        self.objective.on_test_epoch_start()

    @property
    def score(self) -> tuple[str, str]:
        """The validation metric that says which network is best, and its direction."""
        return self.objective.score

    def on_train_end(self) -> None:
        self.record.close(self.max_skipped)

    # -- checkpoint state -------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fprnn"] = dataclasses.asdict(self.record)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.record = RunRecord(**checkpoint.get("fprnn", {}))
