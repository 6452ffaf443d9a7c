"""The hand-written chain rule fprnn trained with before the rules became autograd's backward
(fprnn.core.implicit), kept as the tests' independent reference: one training step's arithmetic for a
stack of fixed-point layers, on plain tensors.

The loss sits on the read-out of the last layer's fixed point. Going down the stack, layer ℓ gets
δ_ℓ = ∇_{r_ℓ} L; its W_ℓ moves by the selected rule on (W_ℓ, r_ℓ, G_ℓ, δ_ℓ); and, where a read-in
is trained or a layer lies below, the implicit adjoint p_ℓ = G_ℓ (I − G_ℓ W_ℓ)^{−T} δ_ℓ gives
∇V_ℓ = mean p_ℓ r_{ℓ−1}ᵀ, ∇b_ℓ = mean p_ℓ and δ_{ℓ−1} = V_ℓᵀ p_ℓ (docs/stack.md).
The read-out's gradient is the ordinary one. Nothing here touches the weights: the result is a
gradient per trained tensor (−ΔW for the W's), for a torch optimizer to apply.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fprnn.core import rules
from fprnn.core.implicit import rule_fault
from fprnn.models.dense import FixedPoint, FixedPointRNN
from fprnn.training.update import solution_fault

Tensor = torch.Tensor


def readout_error(task: str, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample losses L_i of the read-out ŷ and their gradients ∇_ŷ L_i (rows).

    classification: cross-entropy of softmax(ŷ), gradient softmax − onehot;
    regression: ‖ŷ − y‖², gradient 2 (ŷ − y)."""
    if task == "classification":
        onehot = F.one_hot(y, out.shape[1]).to(out.dtype)
        return F.cross_entropy(out, y, reduction="none"), torch.softmax(out, 1) - onehot
    err = out - y
    return (err ** 2).sum(1), 2 * err


def loss_and_grad(task: str, model: FixedPointRNN, r: Tensor, y: Tensor,
                  units: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample losses L_i, their gradients δ_i = ∇_r L_i (rows) at the last layer's rates r,
    and the prediction ŷ: the read-out W_out r + b_out (r itself without one), or — fitting
    recorded responses — the rates of the recorded ``units`` themselves, so that δ is nonzero on
    those units only. δ = W_outᵀ ∇_ŷ L through a read-out (section 3.1)."""
    losses, err, out = _prediction_error(task, model, r, y, units)
    return losses, _delta(model, r, err, units), out


def _prediction_error(task, model, r, y, units):
    """(L_i, ∇_ŷ L_i, ŷ) of the prediction ŷ that :func:`loss_and_grad` describes."""
    out = model.readout(r) if units is None else r[:, units]
    losses, err = readout_error(task, out, y)
    return losses, err, out


def _delta(model, r, err, units):
    """δ = ∇_r L from ∇_ŷ L: through the read-out, or onto the recorded units."""
    if units is not None:
        return torch.zeros_like(r).index_copy_(1, units, err)
    return err @ model.W_out if model.W_out is not None else err


@dataclass
class StackStep:
    """What one step computed: per-layer fixed points and δ_ℓ (of the samples used), the
    gradient of every trained tensor by its ``named_parameters`` name, and the first fault."""
    fps: list[FixedPoint]
    losses: Tensor
    logits: Tensor
    keep: Tensor | None                          # samples used (None: all)
    deltas: list[Tensor] = field(default_factory=list)
    grads: dict[str, Tensor] = field(default_factory=dict)
    fault: str | None = None
    weights_before: list[Tensor] = field(default_factory=list)   # each W_ℓ the step started from
    skipped: bool = False

    @property
    def n_used(self) -> int:
        return len(self.losses) if self.keep is None else int(self.keep.sum())


def solve_and_check(model: FixedPointRNN, p: Tensor,
                    max_nonconverged: float) -> tuple[list[FixedPoint], Tensor | None, str | None]:
    """Every layer's fixed point for inputs p, the samples fit to learn from (converged in every
    layer; None = all) and the first fault (fprnn.training.update.solution_fault)."""
    fps = model.fixed_points(p)
    if not torch.isfinite(p).all():
        return fps, None, "non-finite input"
    fault = solution_fault(fps, max_nonconverged)
    keep = None
    for fp in fps:
        if fp.solution.tol is not None:
            keep = fp.solution.converged if keep is None else keep & fp.solution.converged
    return fps, keep, fault


@torch.no_grad()
def _forward(model: FixedPointRNN, p: Tensor, y: Tensor, task: str, max_nonconverged: float,
             units: Tensor | None) -> tuple[StackStep, Tensor, Tensor]:
    """The fixed points, losses, ∇_ŷ L and δ_L of a step, with the first fault found so far."""
    fps, keep, fault = solve_and_check(model, p, max_nonconverged)
    losses, err, logits = _prediction_error(task, model, fps[-1].r, y, units)
    if fault is None and not torch.isfinite(losses).all():
        fault = "non-finite loss"
    return StackStep(fps, losses, logits, keep, fault=fault), err, _delta(model, fps[-1].r, err, units)


def _nonfinite(grads: dict[str, Tensor]) -> str | None:
    bad = [name for name, g in grads.items() if not torch.isfinite(g).all()]
    return f"non-finite gradient of {', '.join(bad)}" if bad else None


@torch.no_grad()
def rule_step(model: FixedPointRNN, p: Tensor, y: Tensor, task: str, rule: Callable, lr: float,
              rule_kwargs: list[dict], *, readin: str = "gradient", max_nonconverged: float = 0.0,
              gather: Callable[[Tensor], Tensor] | None = None, units: Tensor | None = None) -> StackStep:
    """The step of a hand-computed rule (module docstring). ``rule_kwargs``: per layer.
    ``gather`` (several devices, w2's shared-gain batch rule): W's rule sees the global batch.
    ``units``: the loss is on these units' rates (recorded responses), see :func:`loss_and_grad`."""
    step, err, delta = _forward(model, p, y, task, max_nonconverged, units)
    if step.fault is not None:
        return step
    fps, keep = step.fps, step.keep
    # samples allowed to miss the tolerance (max_nonconverged) are left out: their r is not a
    # fixed point, so no formula here holds for them
    rows = (lambda t: t) if keep is None or bool(keep.all()) else (lambda t: t[keep])
    m, L = step.n_used, len(model.layers)
    for name, _ in model.named_readouts():
        step.grads[name] = rows(err).T @ rows(fps[-1].r) / m if name == "W_out" else rows(err).mean(0)
    delta = rows(delta)
    step.deltas = [None] * L
    for l in reversed(range(L)):
        layer, fp = model.layers[l], fps[l]
        W, r, gain = layer.W.detach(), rows(fp.r), rows(fp.gain)
        step.deltas[l] = delta
        info: dict = {}
        if isinstance(layer.W, torch.nn.Parameter):
            rr, gg, dd = (r, gain, delta) if gather is None else (gather(r), gather(gain), gather(delta))
            dW, info = rule(W, rr, gg, dd, lr, return_info=True, **rule_kwargs[l])
            fault = rule_fault(info)
            if fault is None and not torch.isfinite(dW).all():
                fault = "non-finite ΔW"
            if fault is not None:
                step.fault = fault + (f" in layer {l}" if L > 1 else "")
                return step
            step.grads[f"layers.{l}.W"] = -dW
        trained = [n for n in ("V", "b") if isinstance(getattr(layer, n), torch.nn.Parameter)]
        if l == 0 and not trained:
            break
        P = info.get("adjoint")
        if P is None and (l > 0 or readin == "gradient"):    # one layer's reparam needs no solve
            P, pinfo = rules.implicit_adjoint(W, gain, delta)
            if pinfo.get("singular"):
                step.fault = f"I − G W singular for {pinfo['singular']} samples in layer {l}"
                return step
        direction = rules.input_factor(W, gain, delta) if readin == "reparam" else P
        s = rows(fps[l - 1].r) if l else rows(model.check_input(p))
        if "V" in trained:
            step.grads[f"layers.{l}.V"] = direction.T @ s / m
        if "b" in trained:
            step.grads[f"layers.{l}.b"] = direction.mean(0)
        if l:
            delta = P @ layer.V.detach() if layer.V is not None else P
    step.fault = step.fault or _nonfinite(step.grads)
    return step


def bptt_step(model: FixedPointRNN, p: Tensor, y: Tensor, task: str, lr: float, backward: Callable,
              *, max_nonconverged: float = 0.0, units: Tensor | None = None) -> StackStep:
    """``rule=bptt``: autograd through every layer's unrolled solver (``FixedPointRNN.unrolled``).
    ``backward`` runs the backward pass (Lightning's ``manual_backward``, which lets DDP average
    the gradients). The W's get η ∂L/∂W, as ΔW = −η ∂L/∂W; the other tensors their gradient."""
    step, _, delta = _forward(model, p, y, task, max_nonconverged, units)
    if step.fault is not None:
        return step
    fps, keep = step.fps, step.keep
    params = dict(model.named_parameters())
    for t in params.values():
        t.grad = None
    # started from the forward pass's states: converged there, each layer's solve returns at once
    bl, _, _ = loss_and_grad(task, model, model.unrolled(p, [fp.solution.u for fp in fps]), y, units)
    backward(lr * bl.mean())
    for name, t in params.items():
        step.grads[name] = t.grad.detach().clone() / (1 if name.endswith(".W") else lr)
        t.grad = None
    step.deltas = [None] * (len(fps) - 1) + [delta if keep is None else delta[keep]]
    step.fault = step.fault or _nonfinite(step.grads)
    return step
