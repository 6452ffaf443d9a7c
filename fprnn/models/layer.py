"""A fixed-point layer for any PyTorch model.

    layer = FixedPointLayer(300, n_in=392, rule="w3")
    r = layer(s)                 # the fixed point r* of r = f(W r + V s + b), with a graph
    loss(readout(r)).backward()  # W.grad: the rule's −ΔW; s: the exact gradient (implicit adjoint)

Everything before and after the layer trains by plain autograd, with any torch optimizer.

η and the optimizer's lr: W.grad is −ΔW of the rule with η = ``eta`` (default 1). For the rules
linear in η (w1, w3, w4, jfb) W.grad is η times the rule's direction, so ``eta=1`` and an
optimizer's lr = η take the paper's step ΔW with SGD (for w1 W.grad is then the gradient). w2 is
not linear in η (its 1 − ηκ_i): give it its step as ``eta`` and use SGD with lr = 1 to take the
paper's exact step; any other optimizer then acts on that step.

The loss: W.grad is summed over the loss's samples like any gradient, so it scales with the loss.
w2 needs to know the loss's per-sample normalisation n (loss = Σ L_i / n): ``loss_norm`` (None: the
batch's row count, a mean-reduced loss over the batch; ``set_loss_norm`` may change it between
forward and backward).

Unconverged samples (the solver and its fallback left them: ``report.used`` is False) take no part
in any rule or gradient — their rows of s get zero — and belong out of the loss
(``loss_fn(out[layer.report.used], y[layer.report.used])``). Faults (w2 out of its domain, a
singular I − G W, non-finite values) raise [`fprnn.core.implicit.FixedPointFault`][fprnn.core.implicit.FixedPointFault] from
``backward()`` (``throw=True``, the default of every layer); ``throw=False`` writes them to ``report.fault`` and
leaves this layer's gradients zero instead, for callers that must not raise there.

Several devices (DDP): DDP averages W.grad like any gradient. The average is the global batch's rule
when every rank's loss is Σ_{its samples} L_i · world / M (M: the samples used on all ranks) and
``loss_norm = M / world``; w2's batch form (eq 3.8) needs the global rows inside backward
([`fprnn.core.implicit.RuleBackward`][fprnn.core.implicit.RuleBackward]'s ``gather``), as ``FixedPointModule`` does.
"""
from __future__ import annotations

from typing import Any

import torch

from fprnn.core import implicit
from fprnn.models.dense import Layer, get_dtype

Tensor = torch.Tensor


class FixedPointLayer(Layer):
    """r∗ = f(W r∗ + V s + b) for inputs s (m, n_in) — or x = s + b with ``n_in=None`` (s has N
    columns). W (N×N) starts as σ_W Z/√N; V (N×n_in) as Z/√n_in, trained unless
    ``train_readin=False``; b (zeros) with ``bias``. ``rule``: w1, w2, w3, w4, jfb or bptt;
    ``eta``, ``loss_norm``, ``throw``: see the module docstring; ``readin``: ``"gradient"`` or
    ``"reparam"`` (V and b move by the reparameterized direction, docs/concepts/stacks.md). ``activation``,
    ``dynamics``, ``solver``, ``solver_kwargs``, ``fallback``: as for [`fprnn.models.dense.FixedPointRNN`][fprnn.models.dense.FixedPointRNN]."""

    def __init__(self, N: int, n_in: int | None = None, *, rule: str = "w3", eta: float = 1.0,
                 rule_kwargs: dict | None = None, activation: Any = "tanh", dynamics: Any = "rate",
                 solver: str = "anderson", solver_kwargs: dict | None = None, sigma_W: float = 0.5,
                 train_readin: bool = True, bias: bool = False, readin: str = "gradient",
                 loss_norm: float | None = None, throw: bool = True, fallback: Any = "default",
                 seed: int = 0, dtype: Any = "float32", bptt_steps: int = 50, bptt_damping: float = 0.5):
        for name, v in (("N", N), ("n_in", n_in)):
            if not (v is None and name == "n_in") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer{' or None' if name == 'n_in' else ''}, "
                                 f"got {v!r}")
        super().__init__(N, n_in, torch.Generator().manual_seed(int(seed)), get_dtype(dtype),
                         activation=activation, dynamics=dynamics, solver=solver, solver_kwargs=solver_kwargs,
                         sigma_W=sigma_W, train_W=True, train_readin=train_readin, bias=bias,
                         bptt_steps=bptt_steps, bptt_damping=bptt_damping,
                         fallback=fallback)
        self.backward_rule = implicit.RuleBackward(
            rule, eta, implicit.resolve_rule_kwargs(rule, rule_kwargs, self), readin=readin,
            loss_norm=loss_norm, throw=throw)

    def forward(self, s: Tensor) -> Tensor:
        want = self.n_in or self.N
        if s.dim() != 2 or s.shape[1] != want:
            raise ValueError(f"FixedPointLayer input must be (m, {want}), got shape {tuple(s.shape)}")
        return super().forward(s.to(self.W.dtype))

    def extra_repr(self) -> str:
        spec = self.backward_rule
        return (f"N={self.N}, n_in={self.n_in}, rule={spec.rule!r}, eta={spec.eta}, activation={self.act.name!r}, "
                f"solver={self.solver_name!r}")
