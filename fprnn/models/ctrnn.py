"""A rate network in time: τ dr/dt = −r + f(W r + V u(t) + b), simulated by Euler steps of dt,
read out at every step as W_out r + b_out — the continuous-time RNN of the cognitive-task
literature (Song et al. 2016, Yang et al. 2019), built from fprnn's [`Layer`][fprnn.models.dense.Layer]
(W, V, b, activation, Dale's law, masks, τ_E/τ_I).

How a trial starts (``start``), for a batch whose first ``static`` steps have a constant input s:

- ``fixed_point``: at the fixed point r₀ = f(W r₀ + V s + b) of the static input, solved by the
  layer's solver (and fallback) as the static network is. The network sits there until the
  static part ends (every step of it is read out at r₀), then the dynamics run. r₀'s backward is
  the rule ([`fprnn.core.implicit`][fprnn.core.implicit]: w1 its exact gradient, w3 the reparameterized step…), the rest
  is BPTT by autograd; W is used by both, so W.grad is the sum. The static period costs a solve
  rather than one unrolled step each, and its memory nothing.
  A trial whose start does not converge (its static input has no fixed point the solver or the
  dynamics reach), or converges to a fixed point the dynamics would leave, starts from rest instead
  and runs through its static period (both counted in ``report``); a trial without a static part
  starts from rest too. Every start is checked, at every call: see [`TrialRNN.start_stability`][fprnn.models.ctrnn.TrialRNN.start_stability].
- ``rest``: r = 0 and BPTT through the whole trial, static period included (the standard way).
- ``learned``: a trained initial state r = h₀ and BPTT through the whole trial.

``truncate`` = k: the gradient flows back through at most k steps (truncated BPTT; with
``fixed_point`` the start then learns only from the first k steps after the static part).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fprnn.core import implicit
from fprnn.core.dynamics import power_radius
from fprnn.core.checks import positive_int
from fprnn.core.stability import stability_bound
from fprnn.models.dense import FixedPoint, Layer, per_layer, get_dtype
from fprnn.models.network import TrialNetwork

Tensor = torch.Tensor
STARTS = ("fixed_point", "rest", "learned")
STABILITY = ("auto", "exact", "power")
#: above this many units ``stability="auto"`` estimates the starts its certificate leaves open by power
#: iteration instead of taking their eigenvalues
EXACT_MAX_N = 512


@dataclass
class StartReport:
    """How the last call's trials started: the fixed point of their static inputs and which trials
    start there (None: no trial started at a fixed point); how many trials that should have started
    at their fixed point started from rest because it did not converge (``from_rest``) or was
    unstable (``unstable``); each trial's stability value (NaN where none was computed; an upper
    bound where a certificate decided it, [`TrialRNN.start_stability`][fprnn.models.ctrnn.TrialRNN.start_stability]), and how many starts
    that certificate decided (``certified``)."""
    fixed_point: FixedPoint | None
    at_fixed_point: Tensor | None
    from_rest: int = 0
    unstable: int = 0
    stability: Tensor | None = None
    certified: int = 0

    @property
    def stability_max(self) -> float | None:
        """The largest stability value over the starts used (< 1 by construction; an upper bound on
        the exact largest where certified starts are among them), or None."""
        if self.stability is None or self.at_fixed_point is None or not bool(self.at_fixed_point.any()):
            return None
        return float(self.stability[self.at_fixed_point].max())


class TrialRNN(TrialNetwork):
    """See the module docstring. ``N`` units; ``n_in`` inputs and ``n_out`` outputs per step; ``dt``
    and ``tau`` (``tau_I`` for inhibitory units) in the same unit (ms), α = dt/τ per unit. W
    starts as σ_W Z/√N (or E/I with ``n_exc``, [`Layer`][fprnn.models.dense.Layer]), V as Z/√n_in, W_out
    as Z/√N, b and b_out at zero; all of them train (W by the rule at the start and by BPTT after)."""

    def __init__(self, N: int = 128, n_in: int | None = None, n_out: int | None = None, *, start: str = "fixed_point",
                 dt: float = 20.0, tau: float = 100.0, tau_I: float | None = None, truncate: int | None = None,
                 activation: Any = "tanh", dynamics: str = "rate", solver: str = "anderson",
                 solver_kwargs: dict | None = None, fallback: Any = "default", sigma_W: float = 0.5,
                 n_exc: Any = None, p_connect: Any = None, mask_path: Any = None, mask_seed: Any = None,
                 self_connections: bool = True, constraint: str = "project", blocks=None, seed: int = 0,
                 dtype: Any = "float32", stability: str = "auto"):
        super().__init__()
        for name, v in (("N", N), ("n_in", n_in), ("n_out", n_out)):
            positive_int(name, v)
        if start not in STARTS:
            raise ValueError(f"unknown start {start!r}; choose one of {list(STARTS)}")
        if stability not in STABILITY:
            raise ValueError(f"unknown stability {stability!r}; choose one of {list(STABILITY)}")
        if dynamics != "rate":
            raise ValueError(f"the network in time simulates rate dynamics (τ dr/dt = −r + f(W r + x)); "
                             f"dynamics={dynamics!r} is not supported")
        for name, v in (("dt", dt), ("tau", tau)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if truncate is not None and (isinstance(truncate, bool) or not isinstance(truncate, int) or truncate < 1):
            raise ValueError(f"truncate must be a positive number of steps or null, got {truncate!r}")
        dt_ = get_dtype(dtype)
        gen = torch.Generator().manual_seed(int(seed))
        layer = Layer(N, n_in, gen, dt_, activation=activation, dynamics=dynamics, solver=solver,
                      solver_kwargs=solver_kwargs, sigma_W=sigma_W, train_W=True, train_readin=True, bias=True,
                      bptt_steps=0, bptt_damping=1.0, n_exc=n_exc, p_connect=p_connect, mask_path=mask_path,
                      mask_seed=mask_seed, self_connections=self_connections, constraint=constraint, blocks=blocks,
                      tau=tau, tau_I=tau_I, fallback=fallback)
        if dt > min(tau, tau_I or tau):
            raise ValueError(f"dt={dt} is longer than the shortest time constant {min(tau, tau_I or tau)}: "
                             f"Euler's steps would overshoot; use dt ≤ τ (dt/τ ≈ 0.1–0.2 is usual)")
        self.layers = nn.ModuleList([layer])
        self.W_out = nn.Parameter((torch.randn(n_out, N, generator=gen, dtype=torch.float64) / math.sqrt(N)).to(dt_))
        self.b_out = nn.Parameter(torch.zeros(n_out, dtype=dt_))
        self.h0 = nn.Parameter(torch.zeros(N, dtype=dt_)) if start == "learned" else None
        self.N, self.n_in, self.n_out, self.start, self.dt, self.truncate = N, n_in, n_out, start, float(dt), truncate
        self.stability_mode = stability
        self.report: StartReport | None = None
        self.config = dict(N=N, n_in=n_in, n_out=n_out, start=start, dt=dt, tau=tau, tau_I=tau_I, truncate=truncate,
                           activation=activation, dynamics=dynamics, solver=solver,
                           solver_kwargs=dict(layer.solver_kwargs), fallback=layer.fallback, sigma_W=sigma_W,
                           n_exc=n_exc, p_connect=p_connect, mask_path=mask_path, mask_seed=mask_seed,
                           self_connections=self_connections, constraint=constraint, blocks=blocks, seed=seed,
                           dtype=str(dt_).replace("torch.", ""), stability=stability)

    # -- what the training module asks of a model ----------------------------------------
    @property
    def alpha(self) -> Tensor:
        """dt/τ per unit."""
        return self.dt / self.layer.tau

    def named_readins(self) -> list[tuple[str, Tensor]]:
        own = [(f"layers.0.{n}", getattr(self.layer, n)) for n in ("V", "b")]
        return own + ([("h0", self.h0)] if self.h0 is not None else [])

    def readins(self) -> list[Tensor]:
        return [t for _, t in self.named_readins()]

    def named_readouts(self) -> list[tuple[str, Tensor]]:
        return [("W_out", self.W_out), ("b_out", self.b_out)]

    def set_backward(self, rule: str = "w1", eta: float = 1.0, rule_kwargs: Any = None, **options) -> None:
        """The rule that is the backward of each trial's start (``start=fixed_point``); see
        [`fprnn.models.dense.FixedPointRNN.set_backward`][fprnn.models.dense.FixedPointRNN.set_backward]."""
        if rule == "bptt" and self.start == "fixed_point":
            raise ValueError("rule=bptt has no fixed point to act on: for BPTT through the static period use "
                             "model.start=rest (or learned); start=fixed_point takes w1, w2, w3, w4 or jfb")
        kw = per_layer("rule_kwargs", rule_kwargs, 1)[0]
        # under start=rest or learned no fixed point is solved and its rule is never called: bptt
        # (autograd through the whole trial) is then what every start does, recorded as w1's spec
        self.layer.backward_rule = implicit.RuleBackward(rule if rule != "bptt" else "w1", eta,
                                                         implicit.resolve_rule_kwargs(rule, kw, self.layer), **options)

    def scale_to_stable(self, p: Tensor, target: float = 0.9) -> float:
        raise ValueError("stable_init scales a static network's W; a network in time (model=ctrnn) has no "
                         "probe inputs to scale it on: set stable_init=null")

    # -- the trial ------------------------------------------------------------------------
    def initial_state(self, ob: Tensor, static: Tensor) -> tuple[Tensor, Tensor]:
        """(r at the start, the steps each trial holds it): the fixed point of the static input
        for ``start=fixed_point`` (0 steps and r = 0 for trials it does not serve), else r = 0 or
        h₀ held for 0 steps. Sets ``report``."""
        B, layer = ob.shape[0], self.layer
        rest = torch.zeros(B, self.N, dtype=ob.dtype, device=ob.device)
        if self.start == "learned":
            self.report = StartReport(None, None)
            return self.h0.expand(B, -1), torch.zeros_like(static)
        if self.start == "rest" or not bool((static > 0).any()):
            self.report = StartReport(None, None)
            return rest, torch.zeros_like(static)
        s = ob[:, 0]
        x = layer.input(s)
        with torch.no_grad():
            fp = layer.fixed_point(x)
            converged = implicit.used_samples(fp.solution, fp.r) & (static > 0)
            stability, certified = self.start_stability(fp, converged)
        here = converged & (stability < 1)
        # an unstable start is left out of the rule as an unconverged one is: it is not a state the
        # network holds, so that trial runs from rest through its static period instead
        report = implicit.Report(fp, here)
        layer.report = report
        self.report = StartReport(fp, here, int(((static > 0) & ~converged).sum()), int((converged & ~here).sum()),
                                  stability, int(certified.sum()))
        if not bool(here.any()):
            return rest, torch.zeros_like(static)
        needs_graph = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (layer.W, layer.V, layer.b, s))
        r0 = implicit.attach(fp.r, fp.gain, layer.W, layer.V, layer.b, s, layer.backward_rule, report) \
            if needs_graph else fp.r
        return torch.where(here.unsqueeze(1), r0, rest), torch.where(here, static, torch.zeros_like(static))

    def states(self, ob: Tensor, static: Tensor) -> Tensor:
        """The rates r_t (B, T, N) of trials with inputs ``ob`` (B, T, n_in) whose first ``static``
        (B,) steps have a constant input: r_t is the state after the input of step t."""
        if ob.dim() != 3 or ob.shape[2] != self.n_in:
            raise ValueError(f"inputs must be (trials, steps, {self.n_in}), got shape {tuple(ob.shape)}")
        ob = ob.to(self.dtype)
        r, hold = self.initial_state(ob, static.to(ob.device))
        layer, T = self.layer, ob.shape[1]
        W, alpha, f = layer.W, self.alpha, layer.act.f
        t0, held_max = min(int(hold.min()), T), int(hold.max())
        # V u_t + b for every step at once; the steps that run unbound in one op, whose backward
        # stacks their gradients once (indexing X[:, t] per step would fill a zero tensor of X's size each)
        X = layer.input(ob)[:, t0:].unbind(1)
        held, out = r, []
        for t in range(t0, T):
            if self.truncate is not None and t > t0 and (t - t0) % self.truncate == 0:
                r = r.detach()
            new = r + alpha * (f(r @ W.T + X[t - t0]) - r)
            r = torch.where((t < hold).unsqueeze(1), r, new) if t < held_max else new
            out.append(r)
        # the steps every trial spends at its start: one tensor, one gradient sum in backward
        return torch.cat([held.unsqueeze(1).expand(-1, t0, -1), *([torch.stack(out, 1)] if out else [])], 1)

    def forward(self, ob: Tensor, static: Tensor) -> Tensor:
        """The read-out W_out r_t + b_out at every step (B, T, n_out)."""
        return self.states(ob, static) @ self.W_out.T + self.b_out

    def stability(self, fp: FixedPoint) -> Tensor:
        """Per trial, the stability value of its start (max Re λ of the Jacobian in units of the
        shortest τ, plus 1: stable iff < 1; [`fprnn.core.dynamics.Dynamics.stability`][fprnn.core.dynamics.Dynamics.stability])."""
        return self.layer.stability(fp)

    @torch.no_grad()
    def start_stability(self, fp: FixedPoint, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(the stability value of each start in ``rows`` (B,) bool, NaN elsewhere — stable iff < 1;
        which of them a certificate decided (B,) bool).

        With ``stability="auto"`` or ``"power"`` every start is decided in two tiers. First a
        certificate shared by the batch ([`fprnn.core.stability.stability_bound`][fprnn.core.stability.stability_bound]: one symmetric
        eigendecomposition of W and an (m, N)·(N, N) product): where it is < 1 the start is stable,
        and its value is that upper bound, not the exact value. The starts it cannot decide get the
        exact value — eigenvalues of T⁻¹(−I + G_i W) (`stability`), once per distinct gain
        vector — under ``"auto"`` for N ≤ ``EXACT_MAX_N``: so the decision is the exact one for
        every start. Above, or with ``"power"``, they get an estimate by power iteration of the
        network's own linearized Euler step M_i = I + dt T⁻¹(−I + G_i W) — the map the simulated
        trial applies near its start: ρ(M_i) < 1 is whether the simulation keeps it — reported as
        1 + τ_min (ρ(M_i) − 1)/dt, which equals the exact value when the dominant eigenvalue is real
        ([`fprnn.core.dynamics.power_radius`][fprnn.core.dynamics.power_radius]; it can underestimate, so for those starts the
        decision is an estimate). ``stability="exact"`` takes the exact value of every start (one
        nonsymmetric eigendecomposition per distinct gain vector: the cost the certificate saves)."""
        out = torch.full(rows.shape, float("nan"), dtype=fp.r.dtype, device=fp.r.device)
        certified = torch.zeros_like(rows)
        if not bool(rows.any()):
            return out, certified
        W, gain = self.layer.W.detach(), fp.gain[rows]
        values = torch.full((len(gain),), float("nan"), dtype=out.dtype, device=out.device)
        if self.stability_mode != "exact":
            bound = stability_bound(W, gain, self.layer.tau)
            values = bound.to(out.dtype)
            certified[rows] = bound < 1
        open_ = ~certified[rows]
        if bool(open_.any()):
            distinct, which = torch.unique(gain[open_], dim=0, return_inverse=True)
            if self.stability_mode == "exact" or (self.stability_mode == "auto" and self.N <= EXACT_MAX_N):
                exact = self.stability(FixedPoint(fp.r[:0], fp.z[:0], distinct, fp.x[:0], fp.solution))
            else:
                alpha = (self.dt / self.layer.tau).to(distinct.dtype)
                rho = power_radius(lambda v: v + alpha * (distinct * (v @ W.T) - v), distinct, iters=200)
                exact = 1 + (rho - 1) / alpha.max()
            values[open_] = exact.to(out.dtype)[which]
        out[rows] = values
        return out, certified
