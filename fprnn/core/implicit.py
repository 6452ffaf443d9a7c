"""The paper's rules as the backward pass of a fixed point: autograd does the chain rule around
the recurrent layer, a custom ``torch.autograd.Function`` supplies the rule at it.

A layer r = f(W r + x), x = V s + b, is solved without a graph; [`attach`][fprnn.core.implicit.attach] then returns its
fixed point r∗ as the output of `_FixedPoint`, whose backward receives g_i = ∂loss/∂r_i
(rows) and hands back

- W: the rule's −ΔW ([`fprnn.core.rules`][fprnn.core.rules]) for the per-sample errors δ_i = n·g_i — for w1 that is
  η ∂loss/∂W, the implicit gradient. A hook on r∗ (TorchDEQ, locuslab/deq) can only produce
  updates Σ (G_i u_i) r_iᵀ; w2/w3 are Σ a_i b_iᵀ with b_i = (I − G_i W)ᵀ(I − G_i W) r_i, which is
  why W is an explicit input here;
- s: the implicit adjoint, p_i Vᵀ with p_i = G_i (I − G_i W)^{−T} g_i (the exact gradient: the
  layers before it — linear, conv, anything — train by plain autograd);
- V, b: p_i s_iᵀ and p_i (their gradient), or with ``readin="reparam"`` the reparameterized
  direction a_i = (I − W G_i) G_i g_i in place of p_i (docs/concepts/stacks.md). Behind an encoder this moves
  the layer's own read-in V only; the encoder still gets the exact gradient.

Scale: a rule is a mean over samples of per-sample steps; W's is returned summed, −ΔW·m/n, so that
W.grad scales with the loss like any gradient (and equals the rule's −ΔW when the loss is the mean
over the m samples used, n = m). The rules linear in δ (w1, w3, w4, jfb) do not depend on n;
w2 does (its 1 − ηκ_i is not linear in δ_i): ``loss_norm`` must be the loss's per-sample
normalisation, the n in loss = Σ L_i / n (None: the batch's row count, a mean-reduced loss).

Samples the solver left unconverged are dropped from every formula (their r is not a fixed point:
no formula holds; zeroing would keep NaN·0 = NaN): their rows of s get no gradient, and they
should be left out of the loss too (``Report.used``). A fault in backward (w2 out of its domain,
a singular I − G W, non-finite values) raises [`FixedPointFault`][fprnn.core.implicit.FixedPointFault] with ``throw=True``;
with ``throw=False`` it is written to the [`Report`][fprnn.core.implicit.Report] and every gradient of the call is zero —
several devices must not raise inside backward, where the other ranks wait in their all-reduce;
the caller reads the report after backward and skips the step everywhere.
"""
from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from fprnn.core.checks import positive
from fprnn.core import rules

Tensor = torch.Tensor

#: how a read-in V (and b) moves: its exact gradient, or the reparameterized direction
READIN_UPDATES = ("gradient", "reparam")


class FixedPointFault(RuntimeError):
    """The rule's backward cannot give a finite update (w2 left its domain, I − G W singular…)."""


@dataclass
class RuleBackward:
    """What the backward of a fixed point computes: the rule for W (``"bptt"``: autograd through
    the unrolled solver instead), its η, its options, how the read-in moves, the loss's per-sample
    normalisation (w2 only) and what a fault does. ``gather`` (several devices, w2's batch form of
    eq 3.8): W's rule sees the global batch's rows, and ``world`` is the number of ranks whose
    losses DDP averages."""
    rule: str = "w3"
    eta: float = 1.0
    rule_kwargs: dict = field(default_factory=dict)
    readin: str = "gradient"
    loss_norm: float | None = None
    throw: bool = True
    gather: Callable[[Tensor], Tensor] | None = None
    world: int = 1

    def __post_init__(self):
        if self.rule != "bptt":
            rules.get_rule(self.rule)
        positive("eta", self.eta, why="the rule's η")
        if self.readin not in READIN_UPDATES:
            raise ValueError(f"unknown readin update {self.readin!r}; choose one of {list(READIN_UPDATES)}")
        if not isinstance(self.throw, bool):
            raise ValueError(f"throw must be true (a fault raises in backward) or false (recorded), got {self.throw!r}")
        if self.loss_norm is not None and (isinstance(self.loss_norm, bool)
                                           or not isinstance(self.loss_norm, (int, float))
                                           or not math.isfinite(self.loss_norm) or self.loss_norm <= 0):
            raise ValueError(f"loss_norm must be a positive number (the n of loss = Σ L_i / n) or None, "
                             f"got {self.loss_norm!r}")

    def norm(self, rows: int) -> float:
        """n of the loss Σ L_i / n: ``loss_norm``, or the batch's ``rows``."""
        return float(self.loss_norm or rows)

    def set_loss_norm(self, n: float | None) -> None:
        """The n of the loss Σ L_i / n that the next backward differentiates (w2 depends on it);
        read at backward, so it may be set after the forward call."""
        self.loss_norm = n
        self.__post_init__()


@dataclass
class Report:
    """One call's record: the fixed point (with its solver stats), the samples fit to learn from,
    and after backward the per-sample errors δ_i = n·∂loss/∂r_i (rows; zero for samples not used)
    and the fault (None: none). ``log``: a list that every recorded fault is appended to as well
    (a layer's running record of them). ``unrolled_residual``: under bptt, where a layer offers
    it, a function giving each sample's mean squared ‖g(u) − u‖ at the unrolled state u, with its
    graph (how far the state the loss reads is from a fixed point; computed only when asked);
    ``local_growth``, likewise, each sample's growth of a perturbation at its fixed point along
    its dominant direction (about ρ(G_i W)), with its graph."""
    fixed_point: object
    used: Tensor
    delta: Tensor | None = None
    fault: str | None = None
    log: list | None = None
    unrolled_residual: Callable[[], Tensor] | None = None
    local_growth: Callable[[], Tensor] | None = None


def resolve_rule_kwargs(rule: str, kwargs: dict | None, layer) -> dict:
    """A rule's options as configured, with w2's ``shared_gain="auto"`` (its default) decided by
    the layer: a linear layer's w2 is the batch form of eq 3.8, a nonlinear one is per sample."""
    kw = dict(kwargs or {})
    if rule == "w2" and kw.get("shared_gain", "auto") == "auto":
        kw["shared_gain"] = bool(layer.act.is_identity)
    return kw


def finite_rows(t: Tensor) -> Tensor:
    """Rows of t with every entry finite. Each row's sum is finite exactly when its entries are,
    unless finite entries overflow it: one pass in the common case, the entrywise test (about
    four passes) only for rows whose sum is not finite."""
    ok = torch.isfinite(t.sum(1))
    if not bool(ok.all()):
        ok = torch.isfinite(t).all(1)
    return ok


def all_finite(t: Tensor) -> bool:
    """Every entry of t finite (see [`finite_rows`][fprnn.core.implicit.finite_rows]: the sum first)."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def used_samples(solution, r: Tensor) -> Tensor:
    """The samples whose r is a fixed point: converged (solvers with a tolerance) and finite."""
    ok = finite_rows(r)
    return ok & solution.converged if solution.tol is not None else ok


def rule_fault(info: dict) -> str | None:
    """What a rule's ``info`` reports as making its step unusable, or None."""
    if info.get("out_of_domain"):
        return (f"w2 left its domain for {info['out_of_domain']} samples "
                f"(min 1 − ηκ = {info['min_denominator']})")
    if info.get("singular"):
        return f"I − G W singular for {info['singular']} samples"
    if info.get("converged") is False:
        if info.get("unconverged"):
            return f"the implicit adjoint did not converge for {info['unconverged']} samples"
        return f"w1 adjoint did not converge in {info['iters']} iterations"
    return None


def attach(r: Tensor, gain: Tensor, W: Tensor, V: Tensor | None, b: Tensor | None, s: Tensor,
           spec: RuleBackward, report: Report, operator: Callable[[Tensor], object] | None = None) -> Tensor:
    """r (solved, no graph) as a function of (W, V, b, s) whose backward is ``spec``'s rule.
    ``operator``: how W's parameter becomes the operator the rules see in this call
    ([`fprnn.core.operators`][fprnn.core.operators], e.g. a kernel → its convolution on this call's maps; None: W is the
    dense matrix)."""
    return _FixedPoint.apply(W, V, b, s, r, gain, spec, report, operator)


class _FixedPoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, W, V, b, s, r, gain, spec, report, operator):
        ctx.spec, ctx.report, ctx.operator = spec, report, operator
        ctx.save_for_backward(W, V, b, s, r, gain)
        return r.view_as(r)

    @staticmethod
    def backward(ctx, grad_r):
        W, V, b, s, r, gain = ctx.saved_tensors
        spec, report = ctx.spec, ctx.report
        need = ctx.needs_input_grad[:4]
        try:
            grads = _rule_backward(W.detach(), V, s.detach(), r, gain, grad_r, spec, report, need, ctx.operator)
        except FixedPointFault as fault:
            if spec.throw:
                raise
            report.fault = str(fault)
            if report.log is not None:
                report.log.append(report.fault)
                warnings.warn("a fixed-point layer's backward fault was recorded: its gradients are zero for that "
                              "batch (layer.faults lists every one)", RuntimeWarning)
            grads = [torch.zeros_like(t) if n else None for t, n in zip((W, V, b, s), need)]
        return (*grads, None, None, None, None, None)


def _rule_backward(W, V, s, r, gain, grad_r, spec, report, need, operator):
    need_W, need_V, need_b, need_s = need
    used = report.used
    if not bool(used.any()):
        raise FixedPointFault("no sample converged")
    every = bool(used.all())
    rows = (lambda t: t) if every else (lambda t: t[used])
    g, r_u, gain_u = rows(grad_r), rows(r), rows(gain)
    n = spec.norm(len(r))
    record_delta(report, spec, grad_r)
    out: list[Tensor | None] = [None, None, None, None]
    P = A = None
    op = W if operator is None else operator(W)
    if need_W:
        delta = rows(report.delta)
        rr, gg, dd = (r_u, gain_u, delta) if spec.gather is None else \
            (spec.gather(r_u), spec.gather(gain_u), spec.gather(delta))
        dW, info = rules.get_rule(spec.rule)(op, rr, gg, dd, spec.eta, return_info=True, **spec.rule_kwargs)
        fault = rule_fault(info)
        if fault is not None:
            raise FixedPointFault(fault)
        # a gathered rule's result is the global batch's on every rank, which DDP then averages
        out[0] = -dW * (len(rr) / (n * (spec.world if spec.gather is not None else 1)))
        if spec.gather is None:     # the rule's own per-sample factors, for the read-in and credit
            P = info["adjoint"] / n if info.get("adjoint") is not None else None
            A = info["input_factor"] / n if info.get("input_factor") is not None else None
    if need_s or ((need_V or need_b) and spec.readin == "gradient"):
        if P is None:
            P, pinfo = rules.implicit_adjoint(op, gain_u, g)
            fault = rule_fault(pinfo)
            if fault is not None:
                raise FixedPointFault(fault)
    if need_V or need_b:
        if spec.readin == "reparam" and A is None:
            A = rules.input_factor(op, gain_u, g)
        direction = A if spec.readin == "reparam" else P
        if need_V:
            out[1] = direction.T @ rows(s)
        if need_b:
            out[2] = direction.sum(0)
    if need_s:
        credit = P @ V if V is not None else P
        out[3] = credit if every else torch.zeros_like(s).index_put_((used,), credit)
    bad = [name for name, t in zip(("W", "V", "b", "s"), out) if t is not None and not all_finite(t)]
    if bad:
        raise FixedPointFault(f"non-finite gradient of {', '.join(bad)}")
    return out


def unroll(g: Callable[[Tensor], Tensor], u: Tensor, steps: int, damping: float = 1.0) -> Tensor:
    """``steps`` damped steps u ← u + α(g(u) − u) from u (α = ``damping``), with autograd's graph
    through each where grad is enabled: BPTT's backward (truncated from a fixed point, or the whole
    forward pass from rest) and the progressive loss's iterations. Every layer unrolls through this
    loop, so a backward by autograd differs between layers only in its map g."""
    for _ in range(steps):
        u = u + damping * (g(u) - u)
    return u


def record_delta(report: Report, spec: RuleBackward, grad_r: Tensor) -> None:
    """Keep the per-sample errors δ_i = n·∂loss/∂r_i of the samples used in ``report``."""
    n = spec.norm(len(grad_r))
    report.delta = n * (grad_r if bool(report.used.all())
                        else torch.where(report.used.unsqueeze(1), grad_r, torch.zeros_like(grad_r)))


def delta_hook(report: Report, spec: RuleBackward) -> Callable[[Tensor], None]:
    """A tensor hook that records δ in ``report`` (`record_delta`) when the gradient reaches the
    unrolled rates. It holds the report weakly: the report may hold the rates' graph
    (``unrolled_residual``, ``local_growth``), and the hook lives on autograd's node, out of sight
    of Python's collector, so a strong reference back would keep every step's graph alive."""
    ref = weakref.ref(report)

    def hook(grad_r: Tensor) -> None:
        alive = ref()
        if alive is not None:
            record_delta(alive, spec, grad_r)
    return hook


class _ScaleGrad(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by a constant (bptt's η on W)."""
    @staticmethod
    def forward(ctx, t, scale):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def scale_grad(t: Tensor, scale: float) -> Tensor:
    return _ScaleGrad.apply(t, scale)
