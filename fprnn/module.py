"""LightningModule: fixed-point forward pass + a hand-computed rule, applied by a torch optimizer."""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics

from . import rules
from .dynamics import eig_W
from .model import FixedPointRNN

Tensor = torch.Tensor
ALL_RULES = sorted([*rules.RULES, "bptt"])
TASKS = ("classification", "regression")


def loss_and_grad(task: str, model: FixedPointRNN, r: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-sample losses L_i, their gradients δ_i = ∇_r L_i (rows), and the read-out ŷ = W_out r
    (r itself when the model has no read-out).

    classification: L = cross-entropy of softmax(ŷ), δ = W_outᵀ (softmax − onehot);
    regression: L = ‖ŷ − y‖², δ = 2 W_outᵀ (ŷ − y) — with no read-out, δ = 2 (r − y) (section 3.1)."""
    out = model.readout(r)
    if task == "classification":
        losses = F.cross_entropy(out, y, reduction="none")
        err = torch.softmax(out, 1) - F.one_hot(y, out.shape[1]).to(r.dtype)
    else:
        err = out - y
        losses = (err ** 2).sum(1)
        err = 2 * err
    return losses, (err @ model.W_out if model.W_out is not None else err), out


def resolve_rule_kwargs(rule: str, kwargs: dict | None, model: FixedPointRNN) -> dict:
    """A rule's options as configured, with w2's ``shared_gain="auto"`` (its default) decided by
    the model: the linear model's w2 is the batch form of eq 3.8, a nonlinear one is per sample."""
    kw = dict(kwargs or {})
    if rule == "w2" and kw.get("shared_gain", "auto") == "auto":
        kw["shared_gain"] = bool(model.act.is_identity)
    return kw


class FixedPointModule(pl.LightningModule):
    """Trains ``model.W`` on fixed points with a rule from :mod:`fprnn.rules` (or ``bptt``).

    Each step solves the batch's fixed point, computes ∇_r L per sample, asks the rule for ΔW and
    hands −ΔW to the optimizer as W's gradient: plain SGD with lr = 1 (the default) makes
    W ← W + ΔW exactly, as in the paper; momentum or Adam then act on the rule's direction.

    Faults — fixed points that did not converge (more than ``max_nonconverged`` of the batch, for
    solvers with a tolerance; fewer are left out of ΔW and counted), NaN/inf in r, the loss or
    ΔW, w2 leaving its domain — never reach W. With ``on_fault="skip"`` the step is
    skipped and counted; ``max_faults`` consecutive faults end training with status "diverged".
    ``on_fault="stop"`` ends it at the first fault. A run that skipped more than ``max_skipped``
    of its steps (all of them, say, when no fixed point converges at the start) has not trained:
    it ends with status "no_progress".
    """

    def __init__(self, model: FixedPointRNN, rule: str = "w3", lr: float = 0.25, task: str = "classification",
                 rule_kwargs: dict | None = None, optimizer: Callable | None = None,
                 on_fault: str = "skip", max_faults: int = 10, max_nonconverged: float = 0.0,
                 max_skipped: float = 0.5, check_every: int = 50):
        super().__init__()
        if rule not in ALL_RULES:
            raise ValueError(f"unknown rule {rule!r}; choose one of {ALL_RULES}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr must be a positive finite number, got {lr!r}")
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {list(TASKS)}")
        if on_fault not in ("skip", "stop"):
            raise ValueError(f"on_fault must be 'skip' or 'stop', got {on_fault!r}")
        if isinstance(max_faults, bool) or not isinstance(max_faults, int) or max_faults < 1:
            raise ValueError(f"max_faults must be a positive integer, got {max_faults!r}")
        if isinstance(max_skipped, bool) or not isinstance(max_skipped, (int, float)) \
                or not 0 <= max_skipped < 1:
            raise ValueError(f"max_skipped must be a fraction in [0, 1), got {max_skipped!r}")
        if task == "classification" and model.W_out is None:
            raise ValueError("classification needs a read-out: set model.n_out to the number of classes")
        self.automatic_optimization = False
        self.model, self.rule_name, self.lr, self.task = model, rule, float(lr), task
        self.rule_kwargs = resolve_rule_kwargs(rule, rule_kwargs, model)
        self.rule = None if rule == "bptt" else rules.get_rule(rule)
        self.optimizer_factory = optimizer
        self.on_fault, self.max_faults, self.max_nonconverged = on_fault, max_faults, max_nonconverged
        self.max_skipped = float(max_skipped)
        self.check_every = int(check_every)   # steps between rank-agreement checks (and each epoch)
        # the loggers get the whole run config from fprnn.run, not these few keys
        self.save_hyperparameters(ignore=["model", "optimizer"], logger=False)
        for split in ("train", "val", "test"):
            setattr(self, f"{split}_loss", torchmetrics.MeanMetric())
            setattr(self, f"{split}_max_residual", torchmetrics.MaxMetric())
            if task == "classification":
                setattr(self, f"{split}_acc", torchmetrics.Accuracy("multiclass", num_classes=model.n_out))
        # run bookkeeping (saved in checkpoints, so a resumed run reports the whole run)
        self.faults = self.consecutive_faults = 0     # a fault skips its step: faults = skipped steps
        self.status = "running"
        self.fault_log: list[str] = []
        self.step_ms: list[float] = []
        self.iters_sum = 0.0
        self.last_step: dict[str, Any] = {}

    # -- optimizer --------------------------------------------------------------------
    def configure_optimizers(self):
        if self.optimizer_factory is None:
            return torch.optim.SGD([self.model.W], lr=1.0)
        return self.optimizer_factory([self.model.W])

    # -- the step ---------------------------------------------------------------------
    def _fault(self, what: str) -> None:
        self.faults += 1
        self.consecutive_faults += 1
        self.fault_log.append(f"step {self.global_step}: {what}")
        self.log("train/faults", float(self.faults), on_step=True)
        if self.on_fault == "stop" or self.consecutive_faults >= self.max_faults:
            self.status = "diverged"
            self.trainer.should_stop = True

    def _cast(self, p: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return p.to(self.model.W.dtype), (y if self.task == "classification" else y.to(self.model.W.dtype))

    def compute_update(self, p: Tensor, y: Tensor) -> dict[str, Any]:
        """Everything one step needs, without touching W: the fixed point, losses, ΔW and the
        first fault found (None if the step is sound)."""
        model = self.model
        p, y = self._cast(p, y)
        x = model.input(p)
        fp = model.fixed_point(x)
        sol = fp.solution
        out: dict[str, Any] = {"fp": fp, "fault": None}
        if not torch.isfinite(x).all():
            out["fault"] = "non-finite input"
        elif not (torch.isfinite(fp.r).all() and torch.isfinite(sol.residual).all()):
            out["fault"] = "non-finite fixed point"
        elif sol.tol is not None and sol.n_nonconverged > self.max_nonconverged * len(fp.r):
            out["fault"] = (f"fixed point not converged for {sol.n_nonconverged}/{len(fp.r)} samples "
                            f"(max residual {sol.max_residual:.3g})")
        losses, delta, logits = loss_and_grad(self.task, model, fp.r, y)
        out.update(losses=losses, logits=logits, y=y, delta=delta, W=model.W.detach().clone())
        # samples allowed to miss the tolerance (max_nonconverged) are left out of ΔW: their r
        # is not a fixed point, so the rule's formula does not hold for them
        keep = sol.converged if (sol.tol is not None and out["fault"] is None) else None
        out["n_used"] = len(fp.r) if keep is None else int(keep.sum())
        if out["fault"] is None and out["n_used"] == 0:
            out["fault"] = "no sample converged"
        if out["fault"] is None and not torch.isfinite(losses).all():
            out["fault"] = "non-finite loss"
        if out["fault"] is not None:
            return out
        if self.rule is not None:
            r, gain = fp.r, fp.gain
            if keep is not None and out["n_used"] < len(r):
                r, gain, delta = r[keep], gain[keep], delta[keep]
            if self.rule_kwargs.get("shared_gain") and self.world > 1:
                # eq 3.8 is one exact step of the *global* batch mean: gather its rank-m factors
                r, gain, delta = (self.all_gather(t).flatten(0, 1) for t in (r, gain, delta))
            dW, info = self.rule(model.W.detach(), r, gain, delta, self.lr,
                                 return_info=True, **self.rule_kwargs)
            if info.get("out_of_domain"):
                out["fault"] = (f"w2 left its domain for {info['out_of_domain']} samples "
                                f"(min 1 − ηκ = {info['min_denominator']})")
            elif info.get("singular"):
                out["fault"] = f"I − G W singular for {info['singular']} samples"
            elif info.get("converged") is False:
                out["fault"] = f"w1 adjoint did not converge in {info['iters']} iterations"
        else:
            # autograd through the unrolled solver; manual_backward lets DDP average the gradient
            r = model.unrolled(x)
            bl, _, _ = loss_and_grad(self.task, model, r, y)
            model.W.grad = None
            self.manual_backward(self.lr * bl.mean())
            dW = -model.W.grad.detach().clone()
            model.W.grad = None
        if out["fault"] is None and not torch.isfinite(dW).all():
            out["fault"] = "non-finite ΔW"
        out["dW"] = dW
        return out

    def on_train_batch_start(self, batch, batch_idx):
        # Ctrl-C is turned into a flag by run.py and raised here, between steps, so that the
        # checkpoint saved on the way out holds a consistent state (W, step and data position)
        if getattr(self, "interrupt_requested", False):
            raise KeyboardInterrupt

    def training_step(self, batch, batch_idx):
        if self.status == "diverged":
            return None
        t0 = time.perf_counter()
        out = self.compute_update(*batch)
        fault = out["fault"]
        fault = self.sync_fault(fault)
        if fault is not None:
            self._fault(fault)
        else:
            dW = self.reduce_update(out["dW"], out)
            opt = self.optimizers()
            opt.zero_grad(set_to_none=False)
            self.model.W.grad = -dW
            opt.step()
            self.consecutive_faults = 0
        self.step_ms.append(1e3 * (time.perf_counter() - t0))
        sol = out["fp"].solution
        self.iters_sum += sol.iters_mean
        out["skipped"] = fault is not None
        self.last_step = out            # for the monitors (fprnn.callbacks): W before the step, r, δ
        bs = len(out["losses"])
        if torch.isfinite(out["losses"]).all():
            self.train_loss(out["losses"].detach().float().mean())
        logs = {"train/loss": self.train_loss,
                "train/left_out": float(len(out["losses"]) - out.get("n_used", len(out["losses"])))}
        if self.task == "classification":
            self.train_acc(out["logits"].argmax(1), out["y"])
            logs["train/acc"] = self.train_acc
        self.log_dict(logs, on_step=True, on_epoch=True, prog_bar=False, batch_size=bs,
                      sync_dist=self.world > 1)
        self.log("loss", out["losses"].mean(), prog_bar=True, on_step=True, on_epoch=False, batch_size=bs)
        self._maybe_check_ranks(batch_idx)
        return None

    # -- multi-device ------------------------------------------------------------------
    # DDP only all-reduces gradients made by autograd; a hand-computed ΔW would silently stay
    # per device. So: every device skips a step if any faulted, and applies the mean ΔW.
    @property
    def world(self) -> int:
        t = self._trainer
        return t.world_size if t is not None else 1

    def sync_fault(self, fault: str | None) -> str | None:
        if self.world == 1:
            return fault
        flag = torch.tensor([0.0 if fault is None else 1.0], device=self.model.W.device)
        flag = self.trainer.strategy.reduce(flag, reduce_op="sum")
        if fault is None and float(flag) > 0:
            return f"a fault on another device ({int(flag)} of {self.world})"
        return fault

    def reduce_update(self, dW: Tensor, out: dict) -> Tensor:
        if self.world == 1 or self.rule is None or self.rule_kwargs.get("shared_gain"):
            return dW   # bptt: DDP averaged the gradient; eq 3.8: computed on the gathered batch
        # ΔW is a mean over samples: weight each device's by its sample count, so the result is
        # the global batch's mean also when devices used different numbers of samples
        n = float(out["n_used"])
        buf = torch.cat([(dW * n).flatten(), dW.new_tensor([n])])      # one flat buffer per step
        buf = self.trainer.strategy.reduce(buf, reduce_op="sum")
        return (buf[:-1] / buf[-1]).reshape(dW.shape)

    def check_rank_agreement(self) -> None:
        """Compare W across devices (a checksum); a mismatch stops the run with an error."""
        if self.world == 1:
            return
        W = self.model.W.detach().double()
        c = torch.stack([W.sum(), (W * W).sum(), (W * torch.arange(W.numel(), dtype=W.dtype,
                         device=W.device).reshape(W.shape)).sum()])
        allc = self.all_gather(c)
        if not bool((allc == allc[0]).all()):
            raise RuntimeError(f"ranks disagree on W after step {self.global_step}: checksums "
                               f"{allc[:, 0].tolist()} — the devices are training different networks")

    def _maybe_check_ranks(self, batch_idx: int) -> None:
        # inside training_step, so every rank reaches the collective at the same point
        last = batch_idx + 1 >= self.trainer.num_training_batches
        if self.world > 1 and (last or (self.check_every and self.global_step % self.check_every == 0)):
            self.check_rank_agreement()

    # -- evaluation -------------------------------------------------------------------
    def _eval_step(self, batch, split: str):
        p, y = self._cast(*batch)
        fp = self.model.fixed_point(self.model.input(p))
        losses, _, logits = loss_and_grad(self.task, self.model, fp.r, y)
        getattr(self, f"{split}_loss")(losses.float())
        logs = {f"{split}/loss": getattr(self, f"{split}_loss")}
        if self.task == "classification":
            acc = getattr(self, f"{split}_acc")
            acc(logits.argmax(1), y)
            logs[f"{split}/acc"] = acc
        mr = getattr(self, f"{split}_max_residual")
        mr(fp.solution.residual.max())
        logs[f"{split}/max_residual"] = mr
        self.log_dict(logs, on_step=False, on_epoch=True, prog_bar=(split == "val"), batch_size=len(p))

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    # -- stability --------------------------------------------------------------------
    @torch.no_grad()
    def probe_stability(self, p: Tensor) -> dict[str, float]:
        """Per-sample stability of the fixed points of a probe batch (solved to tolerance, see
        FixedPointRNN.solved_fixed_point), the largest residual of that solve, and eig(W)."""
        p = p.to(self.model.W.dtype).to(self.model.W.device)
        fp = self.model.solved_fixed_point(self.model.input(p))
        s = self.model.stability(fp)
        re_W, rho_W = eig_W(self.model.W)
        return {"max_re_eig": float(s.max()), "frac_stable": float((s < 1).float().mean()),
                "max_re_eig_W": re_W, "spectral_radius_W": rho_W,
                "probe_residual": float(fp.solution.residual.max())}

    def on_train_end(self) -> None:
        attempted = len(self.step_ms)
        if self.status == "running" and attempted and self.faults > self.max_skipped * attempted:
            self.status = "no_progress"

    # -- checkpoint state -------------------------------------------------------------
    _STATE = ("faults", "consecutive_faults", "status", "fault_log", "step_ms", "iters_sum")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["fprnn"] = {k: getattr(self, k) for k in self._STATE}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        for k, v in checkpoint.get("fprnn", {}).items():
            setattr(self, k, v)

    def summary(self) -> dict[str, Any]:
        n = max(len(self.step_ms), 1)
        return {"step_ms_median": statistics.median(self.step_ms) if self.step_ms else None,
                "solver_iters_mean": self.iters_sum / n, "faults": self.faults,
                "attempted_steps": len(self.step_ms),
                "fault_log": self.fault_log[-20:]}
