"""Convolutional recurrent connectivity: r = f(K ⋆ r + x) on C×H×W maps, trained by the rules.

    layer = ConvFixedPointLayer(32, (14, 14), rule="w3")
    r = layer(x)                  # x (m, 32, 14, 14) from any module (a conv stem); r the same shape
    loss(head(r)).backward()      # K.grad: the rule's −ΔK; x: the exact gradient

The recurrent W is the convolution with the kernel K (C, C, k, k) (stride 1, size-keeping zero
or circular padding): the rules see it as an operator ([`fprnn.core.operators.Conv2d`][fprnn.core.operators.Conv2d]), so
nothing N×N is ever formed (N = C·H·W; 25,088 at C = 32 on 28×28). The backward is
[`fprnn.core.implicit`][fprnn.core.implicit]'s with that operator: the rule's step on K (the adjoint of K ↦ W applied to
the dense rule's Σ u_i v_iᵀ, docs/concepts/rules.md) and the implicit adjoint for x — by the adjoint
iteration and Anderson, as there is no matrix to factor.

Any optimizer: the bare layer bounds ‖W‖₂ ≤ ``max_norm`` (0.95) by rescaling K after any step that
moved it past (a contraction: one fixed point, reached from any start) and records backward faults
instead of raising them ([`ConvFixedPointLayer`][fprnn.models.conv.ConvFixedPointLayer]). ``size=None``: maps of any size, one kernel.

Forward: fprnn's solvers on the flattened maps (Anderson by default, per-sample stopping); the
samples it leaves unconverged follow the rate dynamics dr/dt = −r + f(K ⋆ r + x) from rest by
error-controlled explicit Runge–Kutta steps to the same tolerance ([`fprnn.core.solvers.following.follow_rk23`][fprnn.core.solvers.following.follow_rk23]:
matrix-free, so the trajectory — and which attractor it reaches — is followed to a stated accuracy;
fixed-step Euler on request; PTC would need per-sample N×N Jacobians and is refused). Stability per sample: ρ(G_i W) by power
iteration ([`spectral_radius`][fprnn.models.conv.spectral_radius]). The exact ρ bounds max Re λ(G_i W) from above, so ρ < 1 would
certify the fixed point stable; the estimate converges from below (tests: within 2% after 400
steps on small maps; the layer takes 30), so it is an estimate, not a certificate.

[`ConvRecurrentNet`][fprnn.models.conv.ConvRecurrentNet] is the image classifier built on it (``model=conv_recurrent``): a conv
stem → the layer → pooled linear read-out, shaped to train with [`fprnn.training.module.FixedPointModule`][fprnn.training.module.FixedPointModule].
"""
from __future__ import annotations

import inspect
import math
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fprnn.core.checks import non_negative, positive_int
from fprnn.core import implicit, solvers
from fprnn.core.activations import get_activation
from fprnn.core.dynamics import get_dynamics, power_direction, power_radius, row_gatherer
from fprnn.models.dense import FixedPoint, get_dtype
from fprnn.models.network import StaticNetwork
from fprnn.core.operators import LAYOUTS, PADDINGS, Conv2d, to_maps, to_rows

Tensor = torch.Tensor

#: the fallbacks that need nothing of W but products (fprnn.core.solvers.following.FALLBACKS)
MATRIX_FREE_FALLBACKS = ("rk23", "euler")
STEM_ACTIVATIONS = {"relu": nn.ReLU, "identity": nn.Identity}
#: the maps (side) on which a layer's max_norm is estimated: circular padding, so their norm is the
#: kernel's frequency response at as many frequencies (fprnn.core.operators.kernel_norm_bound)
NORM_PROBE_SIZE = 32
#: rule options that need W as a matrix (fprnn.core.rules): refused here, and why
_MATRIX_ONLY = {("w3", "metric", "batch"): "w3's batch metric forms N×N factors",
                ("w2", "shared_gain", True): "w2's batch form (eq 3.8) is the linear dense model's"}


def conv_rule_kwargs(rule: str, kwargs: dict | None) -> dict:
    """A rule's options for a conv W: w2 per sample; the matrix-only forms refused by name."""
    kw = dict(kwargs or {})
    if rule == "w2" and kw.get("shared_gain", "auto") == "auto":
        kw["shared_gain"] = False
    for (name, key, value), why in _MATRIX_ONLY.items():
        if rule == name and kw.get(key) == value:
            raise ValueError(f"rule {name} with {key}={value!r} needs W as a matrix ({why}); a conv W "
                             f"takes the per-sample rule")
    if rule == "w1" and kw.get("method") == "exact":
        raise ValueError("w1 method='exact' factors I − G_i W; a conv W takes method 'auto' (adjoint "
                         "iteration, then Anderson)")
    return kw


def spectral_radius(op, gain: Tensor, iters: int = 30, seed: int = 0) -> Tensor:
    """ρ(G_i W) per sample (m,) by power iteration ([`fprnn.core.dynamics.power_radius`][fprnn.core.dynamics.power_radius])."""
    return power_radius(lambda v: gain * op(v), gain, iters, seed)


class ConvFixedPointLayer(nn.Module):
    """r∗ = f(K ⋆ r∗ + x) for inputs x (m, C, H, W) → r∗ (m, C, H, W).

    ``channels`` C, ``size`` (H, W) — or None: each call's maps have their own size, and the same
    kernel runs on any — ``kernel`` k (odd), ``padding`` zeros | circular.

    Any optimizer: with ``max_norm`` (default 0.95; None: off) each call first scales K back to
    ‖W‖₂ ≤ max_norm if the last step moved it past (`bound_norm`): the map is then a
    contraction, with one fixed point, stable and reached from any start, whatever lr the user's
    optimizer has. A backward that cannot give a finite step raises
    [`fprnn.core.implicit.FixedPointFault`][fprnn.core.implicit.FixedPointFault] (``throw=True``, every layer's
    default); with ``throw=False`` it leaves the layer's gradients zero for that batch, appends its
    reason to ``layer.faults`` and warns once, and the loop goes on.
    ``iters_per_side``: the solve's budget grows with the map (`budget`).

    The kernel is
    the layer's ``W`` parameter (so that training code that moves "each layer's W" moves it),
    shape (C, C, k, k), starting as σ_W Z/√(C k²) (each unit gets C k² weights: spectral radius
    about σ_W, as for the dense σ_W Z/√N). ``rule`` w1, w2, w3, w4, jfb or bptt (autograd
    through ``bptt_steps`` damped steps from the fixed point); ``eta``, ``loss_norm``, ``throw``
    as for [`fprnn.models.layer.FixedPointLayer`][fprnn.models.layer.FixedPointLayer]. ``solver`` (anderson, iterate) with
    ``solver_kwargs``; ``fallback`` {"method": "rk23" or "euler", its options, max_share} or None.
    ``layout`` (hwc, chw): how the rows the layer solves on hold a map (`fprnn.core.operators.LAYOUTS`;
    hwc, channels last, is the faster on a CPU); inputs and outputs are (m, C, H, W) maps either way."""

    def __init__(self, channels: int, size=None, kernel: int = 3, padding: str = "zeros", *, rule: str = "w3",
                 eta: float = 1.0, rule_kwargs: dict | None = None, activation: Any = "tanh",
                 solver: str = "anderson", solver_kwargs: dict | None = None, fallback: Any = "default",
                 sigma_W: float = 0.5, throw: bool = True, loss_norm: float | None = None, seed: int = 0,
                 dtype: Any = "float32", bptt_steps: int = 30, bptt_damping: float = 0.5,
                 stability_iters: int = 30, layout: str = "hwc", max_norm: float | None = 0.95,
                 iters_per_side: float | None = None):
        super().__init__()
        C, k = positive_int("channels", channels), positive_int("kernel", kernel, odd=True)
        if size is not None and not (isinstance(size, (list, tuple)) and len(size) == 2):
            raise ValueError(f"size must be the maps' [height, width] or None (any size), got {size!r}")
        self.size = None if size is None else tuple(positive_int("size", s) for s in size)
        for name, v in (("max_norm", max_norm), ("iters_per_side", iters_per_side)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                  or v <= 0):
                raise ValueError(f"{name} must be a positive number or None, got {v!r}")
        self.max_norm, self.iters_per_side = max_norm, iters_per_side
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r}; choose one of {list(PADDINGS)}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
        non_negative("sigma_W", sigma_W)
        if solver not in solvers.SOLVERS or solver == "euler":
            raise ValueError(f"solver {solver!r} is not one for a conv layer; choose 'anderson' or 'iterate'")
        if isinstance(fallback, dict) and fallback.get("method") not in MATRIX_FREE_FALLBACKS:
            raise ValueError(f"a conv layer's fallback must be matrix-free, one of {list(MATRIX_FREE_FALLBACKS)}; "
                             f"{fallback.get('method')!r} would form per-sample N×N Jacobians")
        self.fallback = solvers.resolve_fallback(fallback, matrix_free=True)
        self.channels, self.kernel, self.padding, self.layout = C, k, padding, layout
        self.N = None if self.size is None else C * self.size[0] * self.size[1]
        self.n_in = None
        self.act, self.dyn = get_activation(activation), get_dynamics("rate")
        self.solver_name, self.solver_kwargs = solver, dict(solver_kwargs or {})
        self.bptt_steps, self.bptt_damping = positive_int("bptt_steps", bptt_steps), float(bptt_damping)
        self.stability_iters = positive_int("stability_iters", stability_iters)
        gen = torch.Generator().manual_seed(int(seed))
        Z = torch.randn(C, C, k, k, generator=gen, dtype=torch.float64)
        self.W = nn.Parameter((sigma_W * Z / math.sqrt(C * k * k)).to(get_dtype(dtype)))
        # a RecurrentLayer (fprnn.models.network) without constraints: no signs, no mask, one time constant
        self.sign = self.mask = self.tau = None
        self.constrained = False
        self.report: implicit.Report | None = None
        self.faults: list[str] = []     # every fault a backward recorded (throw=False)
        self.rescaled = 0               # forward calls that scaled K back to max_norm
        self._norm_probe: Tensor | None = None
        self._norm_key = None
        self.set_backward(rule, eta, rule_kwargs, loss_norm=loss_norm, throw=throw)

    def _size(self, size) -> tuple[int, int]:
        size = self.size if size is None else tuple(size)
        if size is None:
            raise ValueError("this layer takes its maps' size from its input: give the size of the maps")
        return size

    def operator(self, K: Tensor | None = None, size=None) -> Conv2d:
        """W as the convolution with kernel K (the layer's own, detached, by default) on maps of
        ``size`` (the layer's own by default)."""
        return Conv2d(self.W.detach() if K is None else K, self._size(size), self.padding, self.layout)

    def rows(self, X: Tensor) -> Tensor:
        """Maps (m, C, H, W) as the rows (m, N) the layer solves on, in its ``layout``."""
        return to_rows(X, self.layout)

    def maps(self, R: Tensor, size=None) -> Tensor:
        """The layer's rows (m, N) as maps (m, C, H, W) (a view)."""
        return to_maps(R, self.channels, self._size(size), self.layout)

    def set_backward(self, rule: str = "w3", eta: float = 1.0, rule_kwargs: dict | None = None, **options) -> None:
        """The rule for K, with η and [`fprnn.core.implicit.RuleBackward`][fprnn.core.implicit.RuleBackward]'s options."""
        kw = conv_rule_kwargs(rule, rule_kwargs)
        self.backward_rule = implicit.RuleBackward(rule, eta, kw, **options)

    @torch.no_grad()
    def bound_norm(self) -> None:
        """K scaled back to ‖W‖₂ ≤ ``max_norm`` whenever it moved: with f 1-Lipschitz (tanh) the map
        r ↦ f(W r + x) is then a contraction, so it has exactly one fixed point, stable, reached from
        any start at a linear rate — whatever step the optimizer took. ‖W‖₂ is estimated by power
        iteration of WᵀW on 32×32 maps with circular padding (their norm is the kernel's frequency
        response at 32² frequencies, the sup over all of which bounds W on every map size and
        padding), continued from the last call's vector: two iterations a call, 30 the first time.
        The estimate is from below (tests: within 2% at the first call), so a max_norm some way under
        1 (the default 0.95) keeps the map a contraction; [`fprnn.core.operators.kernel_norm_bound`][fprnn.core.operators.kernel_norm_bound]
        gives a certain bound."""
        W = self.W
        if self.max_norm is None or self._norm_key == (W.data_ptr(), W._version):
            return
        op = Conv2d(W.detach(), (NORM_PROBE_SIZE, NORM_PROBE_SIZE), "circular")
        v, iters = self._norm_probe, 2
        if v is None or v.dtype != W.dtype or v.device != W.device:
            gen = torch.Generator(device=W.device).manual_seed(0)
            v, iters = torch.randn(1, op.n, generator=gen, dtype=W.dtype, device=W.device), 30
        for _ in range(iters):
            v = op.T(op(v))
            v = v / v.norm()
        sigma = float(op(v).norm())
        if sigma > self.max_norm:
            W.mul_(self.max_norm / sigma)
            self.rescaled += 1
        self._norm_probe, self._norm_key = v, (W.data_ptr(), W._version)

    def set_loss_norm(self, n: float | None) -> None:
        self.backward_rule.set_loss_norm(n)

    def _state_map(self, op, x: Tensor):
        rows_of = row_gatherer(x)

        def g(u: Tensor, rows: Tensor | None = None) -> Tensor:
            return self.act.f(op(u) + rows_of(rows))
        return g

    def budget(self, size) -> dict:
        """The solver's options on maps of ``size``: with ``iters_per_side`` its ``max_iter`` (and a
        fallback's ``steps``) grow with the longer side, to at least iters_per_side × max(H, W) —
        what crosses a map must cross it, one kernel radius an iteration."""
        solver_kw = dict(self.solver_kwargs)
        fallback = None if self.fallback is None else dict(self.fallback)
        if self.iters_per_side is not None:
            base = solver_kw.get("max_iter",
                                 inspect.signature(solvers.SOLVERS[self.solver_name]).parameters["max_iter"].default)
            need = math.ceil(self.iters_per_side * max(size))
            solver_kw["max_iter"] = max(base, need)
            if fallback is not None and "steps" in fallback:
                fallback["steps"] = max(fallback["steps"], need)
        return {"solver": solver_kw, "fallback": fallback}

    @torch.no_grad()
    def fixed_point(self, x: Tensor, u0: Tensor | None = None, size=None, budget: dict | None = None) -> FixedPoint:
        """Solve r = f(K ⋆ r + x) for inputs x (m, N) as rows in the layer's layout (`rows`)
        of maps of ``size`` (the layer's own by default), from u0 (rest by default), with
        ``budget`` ({"solver": options, "fallback": options or None, and optionally "method": another
        of `fprnn.core.solvers.SOLVERS`, e.g. Anderson at test time; the layer's own,
        [`budget`][fprnn.models.conv.ConvFixedPointLayer.budget], by default); the fixed point's rows
        are in that layout too (`maps`)."""
        size = self._size(size)
        op, x = self.operator(size=size), x.detach()
        g = self._state_map(op, x)
        u0 = torch.zeros_like(x) if u0 is None else u0
        budget = self.budget(size) if budget is None else budget
        method = budget.get("method", self.solver_name)
        if method not in solvers.SOLVERS:
            raise ValueError(f"unknown solver {method!r} in the budget; choose one of {sorted(solvers.SOLVERS)}")
        sol = solvers.SOLVERS[method](g, u0, **budget["solver"])
        if budget["fallback"] is not None:
            sol = solvers.settle(g, u0, sol, **budget["fallback"])
        z = op(sol.u) + x
        return FixedPoint(sol.u, z, self.act.df(z), x, sol, size)

    def forward(self, x: Tensor, u0: Tensor | None = None, budget: dict | None = None) -> Tensor:
        """r∗ for maps x (m, C, H, W) (of the layer's size, or any with ``size=None``), solved from
        u0 (maps; rest by default) with ``budget`` (as for ``fixed_point``)."""
        want = "H, W" if self.size is None else ", ".join(map(str, self.size))
        if x.dim() != 4 or x.shape[1] != self.channels or (self.size is not None and tuple(x.shape[2:]) != self.size):
            raise ValueError(f"ConvFixedPointLayer input must be (m, {self.channels}, {want}), "
                             f"got shape {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        self.bound_norm()
        s = self.rows(x.to(self.W.dtype))
        with torch.no_grad():
            fp = self.fixed_point(s, None if u0 is None else self.rows(u0.to(s.dtype)), size, budget)
        self.report = implicit.Report(fp, implicit.used_samples(fp.solution, fp.r), log=self.faults)
        spec = self.backward_rule
        if not (torch.is_grad_enabled() and (self.W.requires_grad or s.requires_grad)):
            return self.maps(fp.r, size)
        if spec.rule == "bptt":
            g = self._state_map(self.operator(implicit.scale_grad(self.W, spec.eta), size), s)
            u = implicit.unroll(g, fp.solution.u, self.bptt_steps, self.bptt_damping)
            self.report.unrolled_residual = lambda u=u: (g(u) - u).pow(2).mean(1)     # noqa: E731
            self.report.local_growth = partial(self.local_growth, fp, s, spec.eta)
            u.register_hook(implicit.delta_hook(self.report, spec))
            return self.maps(u, size)
        r = implicit.attach(fp.r, fp.gain, self.W, None, None, s, spec, self.report,
                            partial(self.operator, size=size))
        return self.maps(r, size)

    def progressive(self, x: Tensor, n: int, k: int) -> Tensor:
        """The state after n + k iterations u ← u + α(f(K ⋆ u + x) − u) from rest (α the solver's
        ``damping``, 1 by default), for maps x (m, C, H, W): the first n without a graph, the last k
        with one — the progressive loss's state (Bansal et al. 2022), which asks the network to
        improve on any partial solution rather than on one path of the iteration."""
        size = tuple(x.shape[2:])
        s = self.rows(x.to(self.W.dtype))
        alpha = float(self.solver_kwargs.get("damping", 1.0))
        with torch.no_grad():
            u = implicit.unroll(self._state_map(self.operator(size=size), s.detach()), torch.zeros_like(s), n, alpha)
        g = self._state_map(self.operator(implicit.scale_grad(self.W, self.backward_rule.eta), size), s)
        return self.maps(implicit.unroll(g, u, k, alpha), size)

    def local_growth(self, fp: FixedPoint, x: Tensor, eta: float = 1.0) -> Tensor:
        """‖G_i K ⋆ v_i‖ per sample (m,), with its graph to K (its gradient scaled by ``eta``) and to x:
        the growth of a small perturbation along v_i, the direction that ``stability_iters`` power
        steps at the fixed point find (no graph). About ρ(G_i K) — what a penalty on it can lower
        where the loss needs a fixed point that plain iteration reaches."""
        op = self.operator(size=fp.size)
        v = power_direction(lambda w: fp.gain * op(w), fp.gain, self.stability_iters)
        op = self.operator(implicit.scale_grad(self.W, eta), fp.size)
        gain = self.act.df(op(fp.r.detach()) + x)
        return torch.linalg.vector_norm(gain * op(v), dim=1)

    def stability(self, fp: FixedPoint) -> Tensor:
        """ρ(G_i W) per sample by power iteration ([`spectral_radius`][fprnn.models.conv.spectral_radius]); stable when < 1."""
        return spectral_radius(self.operator(size=fp.size), fp.gain, self.stability_iters)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, size={self.size}, kernel={self.kernel}, padding={self.padding!r}, "
                f"rule={self.backward_rule.rule!r}, activation={self.act.name!r}, solver={self.solver_name!r}")


class OneConvLayerNet(StaticNetwork):
    """What a network around one [`ConvFixedPointLayer`][fprnn.models.conv.ConvFixedPointLayer] (``self.layers[0]``) shows the
    training module: the layer, its dtype, the samples used, its fixed points and its rule. The
    network gives ``features`` (input → the layer's x maps)."""

    @property
    def layer(self) -> ConvFixedPointLayer:
        return self.layers[0]

    @torch.no_grad()
    def fixed_points(self, p: Tensor, solved: bool = False) -> list[FixedPoint]:
        """The layer's fixed points for images p (the solver is always one with a tolerance), rows in
        the layer's layout (``self.layer.maps`` turns them into maps)."""
        x = self.features(p)
        return [self.layer.fixed_point(self.layer.rows(x), size=tuple(x.shape[2:]))]

    @property
    def used(self) -> Tensor:
        if self.layer.report is None:
            raise RuntimeError(f"no forward call yet: {type(self).__name__}.used describes the last call")
        return self.layer.report.used

    def set_backward(self, rule: str = "w3", eta: float = 1.0, rule_kwargs: Any = None, **options) -> None:
        self.layer.set_backward(rule, eta, rule_kwargs, **options)


class ConvRecurrentNet(OneConvLayerNet):
    """Images → conv stem → r∗ = f(K ⋆ r∗ + x) → average-pooled (conv head →) linear read-out.

    The stem is one ``stem_kernel`` convolution from the image's channels to ``stem_channels``
    (default: ``channels``) with bias, ``stem_activation`` (relu or identity) and
    ``stem_pool``×``stem_pool`` max-pooling (1: none); then, with ``readin_kernel`` (0: none), the
    layer's read-in, a convolution to ``channels`` maps with bias: its output is x. The
    read-out average-pools r∗ by ``readout_pool``, with ``head_channels`` (0: none) passes it through
    a head — a ``head_kernel`` convolution to that many maps with bias, then ReLU — and maps the
    result linearly to ``n_out`` classes. Stem and read-out (the head included) train by autograd
    (the read-in and read-out parameter groups of [`fprnn.training.module.FixedPointModule`][fprnn.training.module.FixedPointModule]), K by the
    rule. ``recurrent=False`` fixes K ≡ 0: the same network without recurrence, r = f(x), the
    feed-forward baseline. ``max_norm`` (default None: K free, as the presets train it): the layer's bound
    on ‖W‖₂ ([`ConvFixedPointLayer`][fprnn.models.conv.ConvFixedPointLayer])."""

    def __init__(self, in_shape=(1, 28, 28), n_in: int | None = None, n_out: int = 10, *, channels: int = 32,
                 kernel: int = 3, padding: str = "zeros", stem_kernel: int = 3, stem_pool: int = 2,
                 readout_pool: int = 2, stem_activation: str = "relu", stem_channels: int | None = None,
                 readin_kernel: int = 0, head_channels: int = 0, head_kernel: int = 3, recurrent: bool = True,
                 seed: int = 0, dtype: Any = "float32", max_norm: float | None = None, **layer_options):
        super().__init__()
        if not (isinstance(in_shape, (list, tuple)) and len(in_shape) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in in_shape)):
            raise ValueError(f"in_shape must be [channels, height, width] of positive integers, got {in_shape!r}")
        self.in_shape = tuple(in_shape)
        self.n_in, self.n_out = math.prod(in_shape), positive_int("n_out", n_out)
        if n_in is not None and n_in != self.n_in:
            raise ValueError(f"n_in={n_in} does not match in_shape {list(in_shape)} ({self.n_in} pixels)")
        sp, rp = positive_int("stem_pool", stem_pool), positive_int("readout_pool", readout_pool)
        c, h, w = in_shape
        if h % sp or w % sp or (h // sp) % rp or (w // sp) % rp:
            raise ValueError(f"{h}×{w} images do not divide by stem_pool={sp} and then readout_pool={rp}")
        if stem_activation not in STEM_ACTIVATIONS:
            raise ValueError(f"unknown stem_activation {stem_activation!r}; choose one of {sorted(STEM_ACTIVATIONS)}")
        self.readout_pool = rp
        size = (h // sp, w // sp)
        dt = get_dtype(dtype)
        stem_channels = channels if stem_channels is None else positive_int("stem_channels", stem_channels)
        if not readin_kernel and stem_channels != channels:
            raise ValueError(f"stem_channels={stem_channels} differs from channels={channels}: a read-in "
                             f"(readin_kernel > 0) must map them")
        with torch.random.fork_rng(devices=[]):     # the stem's and read-out's init (torch's defaults), seeded
            torch.manual_seed(int(seed))
            stem = [nn.Conv2d(c, stem_channels, positive_int("stem_kernel", stem_kernel, odd=True),
                              padding=stem_kernel // 2), STEM_ACTIVATIONS[stem_activation]()]
            if sp > 1:
                stem.append(nn.MaxPool2d(sp))
            if readin_kernel:
                stem.append(nn.Conv2d(stem_channels, channels,
                                      positive_int("readin_kernel", readin_kernel, odd=True),
                                      padding=readin_kernel // 2))
            self.stem = nn.Sequential(*stem).to(dt)
            self.head = None
            if head_channels:
                self.head = nn.Sequential(
                    nn.Conv2d(channels, positive_int("head_channels", head_channels),
                              positive_int("head_kernel", head_kernel, odd=True), padding=head_kernel // 2),
                    nn.ReLU()).to(dt)
            linear = nn.Linear((head_channels or channels) * (size[0] // rp) * (size[1] // rp), n_out).to(dt)
        self.W_out, self.b_out = linear.weight, linear.bias
        layer = ConvFixedPointLayer(channels, size, kernel, padding, seed=seed, dtype=dtype, max_norm=max_norm,
                                    **layer_options)
        if not recurrent:
            layer.W.requires_grad_(False).zero_()
        self.layers = nn.ModuleList([layer])
        self.config = dict(in_shape=list(in_shape), n_out=n_out, channels=channels, kernel=kernel, padding=padding,
                           stem_kernel=stem_kernel, stem_pool=sp, readout_pool=rp, stem_activation=stem_activation,
                           stem_channels=stem_channels, readin_kernel=readin_kernel, head_channels=head_channels,
                           head_kernel=head_kernel, recurrent=recurrent, seed=seed, dtype=str(dtype), max_norm=max_norm,
                           **layer_options)

    def readins(self) -> list[Tensor]:
        return list(self.stem.parameters())

    def named_readouts(self) -> list[tuple[str, Tensor]]:
        head = [] if self.head is None else [(f"head.{n}", t) for n, t in self.head.named_parameters()]
        return [*head, ("W_out", self.W_out), ("b_out", self.b_out)]

    def features(self, p: Tensor) -> Tensor:
        """x: the stem's maps for flattened (or shaped) images p."""
        return self.stem(p.to(self.dtype).reshape(len(p), *self.in_shape))

    def readout(self, r: Tensor) -> Tensor:
        pooled = F.avg_pool2d(r, self.readout_pool) if self.readout_pool > 1 else r
        if self.head is not None:
            pooled = self.head(pooled)
        return F.linear(pooled.flatten(1), self.W_out, self.b_out)

    def forward(self, p: Tensor) -> Tensor:
        return self.readout(self.layer(self.features(p)))

