"""Batched fixed-point solvers with per-sample stopping.

Every solver takes a map ``g(u, rows)`` (see [`fprnn.core.dynamics`][fprnn.core.dynamics]) and a start ``u0`` (m, N),
and returns a [`Solution`][fprnn.core.solvers.Solution]: the states and per-sample stats. The residual of sample i is
‖g(u_i) − u_i‖∞ at the returned u_i (for rate dynamics: ‖f(W r + x) − r‖∞). A sample stops
costing compute once its residual is ≤ ``tol``; a sample that does not get there within the
budget, or whose state stops being finite, is reported in ``converged`` and ``status`` — never
hidden.

[`settle`][fprnn.core.solvers.settle] is the fallback of continuous-time networks: the samples an accelerated solver
leaves unconverged are solved again from their start by following the network's own dynamics
([`ptc`][fprnn.core.solvers.ptc]), so that a solver's failure is not mistaken for the network's.
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from fprnn.core.dynamics import StateMap

Tensor = torch.Tensor


#: A sample's outcome (``Solution.status``): at a fixed point within tol; out of budget; at a
#: fixed point the dynamics cannot reach (unstable, found by the fallback); not finite.
SUCCESSFUL, MAX_STEPS, UNSTABLE, NONFINITE = 0, 1, 2, 3
STATUS_NAMES = {SUCCESSFUL: "successful", MAX_STEPS: "did not settle within the budget",
                UNSTABLE: "unstable fixed point (max Re λ ≥ 1)", NONFINITE: "non-finite"}


@dataclass
class Solution:
    u: Tensor                # (m, N) the state at which each residual was measured
    iters: Tensor            # (m,) evaluations of g spent on each sample (fallback steps included)
    residual: Tensor         # (m,) ‖g(u) − u‖∞ per sample
    converged: Tensor        # (m,) bool: residual ≤ tol (always False for a fixed-step run without tol)
    tol: float | None = None
    solver: str = ""
    status: Tensor | None = None          # (m,) codes above; None: derived from converged and residual
    fallback: Tensor | None = None        # (m,) bool: handed to the dynamics by settle()
    fallback_iters: Tensor | None = None  # (m,) the fallback's steps on each sample

    def __post_init__(self):
        if self.status is None:
            self.status = torch.where(self.converged, SUCCESSFUL,
                                      torch.where(torch.isfinite(self.residual), MAX_STEPS, NONFINITE))
        if self.fallback is None:
            self.fallback = torch.zeros_like(self.converged)
            self.fallback_iters = torch.zeros_like(self.iters)

    def failures(self) -> str:
        """The unconverged samples by cause, e.g. "2 did not settle within the budget, 1 non-finite"."""
        counts = torch.bincount(self.status.flatten().long(), minlength=len(STATUS_NAMES)).tolist()
        return ", ".join(f"{n} {STATUS_NAMES[code]}" for code, n in enumerate(counts) if n and code != SUCCESSFUL)

    @property
    def max_residual(self) -> float:
        return float(self.residual.max()) if self.residual.numel() else 0.0

    @property
    def mean_residual(self) -> float:
        return float(self.residual.mean()) if self.residual.numel() else 0.0

    @property
    def iters_mean(self) -> float:
        return float(self.iters.float().mean()) if self.iters.numel() else 0.0

    @property
    def n_nonconverged(self) -> int:
        return int((~self.converged).sum())

    def stats(self) -> dict[str, float]:
        return {
            "iters": self.iters_mean,
            "iters_max": float(self.iters.max()) if self.iters.numel() else 0.0,
            "max_residual": self.max_residual,
            "mean_residual": self.mean_residual,
            "nonconverged": float(self.n_nonconverged),
            "fallback": float(self.fallback.sum()),
            "fallback_iters": float(self.fallback_iters.sum()),
        }


def _check_positive(name: str, value, integer: bool = False, allow_none: bool = False):
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


class _Tracker:
    """Book-keeping shared by the solvers. The solver iterates a *working set* of samples
    (``rows``; None = all). A sample that finishes (residual ≤ tol, or not finite) has its state
    recorded and is marked dead; dead rows are dropped from the working set only once they make
    up ``compact_at`` of it, because compacting copies the solver's whole state."""

    def __init__(self, u0: Tensor, tol: float | None, compact_at: float = 0.25):
        if u0.dim() != 2:
            raise ValueError(f"u0 must be (m, N), got shape {tuple(u0.shape)}")
        m = u0.shape[0]
        self.tol, self.compact_at = tol, compact_at
        self.u = u0.clone()
        self.iters = torch.zeros(m, dtype=torch.long, device=u0.device)
        self.residual = torch.full((m,), math.inf, dtype=u0.dtype, device=u0.device)
        self.converged = torch.zeros(m, dtype=torch.bool, device=u0.device)
        self.rows: Tensor | None = None          # working set (indices into the batch)
        self.live = torch.ones(m, dtype=torch.bool, device=u0.device)  # over the working set
        self.done = m == 0
        self.stalled = torch.zeros(m, dtype=torch.bool, device=u0.device)

    def _orig(self, idx: Tensor) -> Tensor:
        return idx if self.rows is None else self.rows[idx]

    def _write(self, idx: Tensor, x: Tensor, res: Tensor, k: int) -> None:
        orig = self._orig(idx)
        self.u[orig] = x[idx]
        self.residual[orig] = res[idx]
        self.iters[orig] = k
        if self.tol is not None:
            self.converged[orig] = res[idx] <= self.tol

    def update(self, x: Tensor, res: Tensor, k: int, stalled: Tensor | None = None) -> Tensor | None:
        """Take the residuals ``res`` of the working set's states ``x`` after ``k`` evaluations
        (``stalled``: rows that leave unconverged, to be handed to another method).
        Returns a mask to compact the solver's state with, or None to keep it as it is."""
        finished = ~torch.isfinite(res)
        if self.tol is not None:
            finished |= res <= self.tol
        if stalled is not None:
            stalled = stalled & ~finished & self.live
            finished |= stalled
        finished &= self.live
        if not bool(finished.any()):
            return None
        self._write(finished.nonzero().squeeze(1), x, res, k)
        if stalled is not None and bool(stalled.any()):
            self.stalled[self._orig(stalled.nonzero().squeeze(1))] = True
        self.live &= ~finished
        n_live = int(self.live.sum())
        if n_live == 0:
            self.done = True
            return None
        if n_live > (1 - self.compact_at) * self.live.numel():
            return None
        keep = self.live
        self.rows = self._orig(keep.nonzero().squeeze(1))
        self.live = torch.ones(n_live, dtype=torch.bool, device=keep.device)
        return keep

    def finish(self, x: Tensor, res: Tensor, k: int) -> None:
        """The budget is spent: record the samples still running, unconverged."""
        if not self.done:
            self._write(self.live.nonzero().squeeze(1), x, res, k)
            self.done = True

    def solution(self, name: str) -> Solution:
        return Solution(self.u, self.iters, self.residual, self.converged, self.tol, name)


def _residual(g: StateMap, x: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
    gx = g(x, rows)
    return gx, (gx - x).abs().amax(1)


def iterate(g: StateMap, u0: Tensor, *, tol: float | None = 1e-5, max_iter: int = 500,
            damping: float = 1.0) -> Solution:
    """(Damped) fixed-point iteration u ← (1 − α) u + α g(u), α = ``damping``.

    With α = 1 this is the discrete network (eq 2.4); with α = dt/τ it is forward Euler of the
    continuous one (eq 2.1), which converges wherever the fixed point is stable for the continuous
    dynamics and α is small enough, also where the plain map oscillates."""
    _check_positive("tol", tol, allow_none=True)
    _check_positive("max_iter", max_iter, integer=True)
    if not (isinstance(damping, (int, float)) and 0 < damping <= 1):
        raise ValueError(f"damping must be in (0, 1], got {damping!r}")
    return _iterate(g, u0, tol, int(max_iter), float(damping), evals=True).solution("iterate")


def _iterate(g, u0, tol, n, damping, evals, stall: float = 0.0, window: int = 5):
    """Damped iteration; with ``stall`` > 0, every ``window`` steps a sample whose residual has
    not shrunk by that factor since the last check leaves the loop (flagged in ``t.stalled``)."""
    t = _Tracker(u0, tol)
    x, last = u0, None
    for k in range(n):
        gx, res = _residual(g, x, t.rows)
        stalled = None
        if stall and k % window == 0 and k > 0:   # from r0 the first steps are a transient
            if last is not None:
                # slow, stalled or growing — or too slow to make it within the budget
                ratio = res / last.clamp_min(torch.finfo(res.dtype).tiny)
                need = torch.log(tol / res) / torch.log(ratio.clamp(max=1 - 1e-7)) * window
                stalled = (ratio > stall) | (need > n - k)
            last = res
        keep = t.update(x, res, k + 1 if evals else k, stalled)
        if t.done:
            break
        x = x + damping * (gx - x)
        if keep is not None:
            x = x[keep]
            if last is not None:
                last = last[keep]
    else:
        t.finish(x, _residual(g, x, t.rows)[1], n + 1 if evals else n)
    return t


def euler(g: StateMap, u0: Tensor, *, dt: float = 0.01, steps: int = 500,
          tol: float | None = None) -> Solution:
    """Forward Euler of τ du/dt = −u + g(u) with step dt/τ = ``dt`` for ``steps`` steps;
    ``iters`` counts steps taken. ``dt`` may be a tensor (N,) of per-unit steps dt/τ_i.

    The paper's forward pass is dt/τ = 0.01 for 500 steps from r = 0 (section 3.2); it stops
    short of the fixed point, which the returned residual shows. With ``tol`` a sample stops
    early once its residual is ≤ tol."""
    _check_positive("steps", steps, integer=True)
    _check_positive("tol", tol, allow_none=True)
    if isinstance(dt, Tensor):
        if not bool(torch.isfinite(dt).all() and (dt > 0).all() and (dt <= 1).all()):
            raise ValueError(f"every unit's dt/τ must be in (0, 1], got values in [{float(dt.min()):.3g}, "
                             f"{float(dt.max()):.3g}]")
    else:
        _check_positive("dt", dt)
        if dt > 1:
            raise ValueError(f"dt (= dt/τ) must be ≤ 1, got {dt!r}")
        dt = float(dt)
    return _iterate(g, u0, tol, int(steps), dt, evals=False).solution("euler")


def anderson(g: StateMap, u0: Tensor, *, tol: float = 1e-5, max_iter: int = 200,
             memory: int = 5, damping: float = 1.0, ridge: float = 1e-6,
             mix_above: float = 1.0) -> Solution:
    """Anderson acceleration (type II) of u = g(u), batched with a per-sample history.

    Each sample mixes its last ``memory`` evaluations with weights α (Σα = 1) that minimise
    ‖Σ α_k (g(u_k) − u_k)‖ (relative ``ridge``); the next iterate is
    ``damping`` · Σ α_k g(u_k) + (1 − damping) · Σ α_k u_k. Being a secant (GMRES-like) method it
    also converges where the plain map oscillates or diverges (e.g. W = −2I with tanh).

    Safeguarded start, per sample: all samples first take plain damped steps — for random
    networks Anderson saves few steps and a plain step costs less. A sample whose residual has
    not shrunk by the factor ``mix_above`` over the last ``memory`` steps (it is slow, stalls,
    oscillates or grows), or shrinks too slowly to reach ``tol`` within ``max_iter``, leaves and
    continues under Anderson mixing from where it is, with a fresh budget of ``max_iter``
    (so a sample costs at most 2·max_iter evaluations).
    ``mix_above=0`` mixes every sample from the start (classic Anderson)."""
    _check_positive("tol", tol)
    _check_positive("max_iter", max_iter, integer=True)
    _check_positive("memory", memory, integer=True)
    if not (isinstance(damping, (int, float)) and 0 < damping <= 1):
        raise ValueError(f"damping must be in (0, 1], got {damping!r}")
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise ValueError(f"ridge must be a non-negative number, got {ridge!r}")
    if not (isinstance(mix_above, (int, float)) and 0 <= mix_above <= 1):
        raise ValueError(f"mix_above must be in [0, 1], got {mix_above!r}")
    memory, max_iter = int(memory), int(max_iter)
    if mix_above == 0:
        return _anderson(g, u0, tol, max_iter, memory, damping, ridge).solution("anderson")
    t = _iterate(g, u0, tol, max_iter, float(damping), evals=True,
                 stall=float(mix_above), window=memory)
    if bool(t.stalled.any()):
        idx = t.stalled.nonzero().squeeze(1)
        def g_sub(u, rows=None):
            return g(u, idx if rows is None else idx[rows])
        t2 = _anderson(g_sub, t.u[idx], tol, max_iter, memory, damping, ridge)
        t.u[idx], t.residual[idx], t.converged[idx] = t2.u, t2.residual, t2.converged
        t.iters[idx] += t2.iters
    return t.solution("anderson")


def _anderson(g, u0, tol, max_iter, memory, damping, ridge) -> _Tracker:
    t = _Tracker(u0, tol)
    m, n = u0.shape
    X = u0.new_zeros(m, memory, n)           # past iterates u_k
    F = u0.new_zeros(m, memory, n)           # past g(u_k)
    R = u0.new_zeros(m, memory, n)           # past residuals g(u_k) − u_k
    H = u0.new_zeros(m, memory, memory)      # their Gram matrix, one new row per step
    eye = torch.eye(memory, dtype=u0.dtype, device=u0.device)
    tiny = torch.finfo(u0.dtype).tiny
    x = u0
    for k in range(max_iter):
        gx, rn = _residual(g, x, t.rows)
        keep = t.update(x, rn, k + 1)
        if t.done:
            break
        res = gx - x
        slot = k % memory
        X[:, slot], F[:, slot], R[:, slot] = x, gx, res
        row = (R * res.unsqueeze(1)).sum(-1)
        H[:, slot, :], H[:, :, slot] = row, row
        h = min(k + 1, memory)
        if h == 1:
            x = x + damping * res
        else:
            Hh = H[:, :h, :h]
            scale = Hh.diagonal(dim1=1, dim2=2).mean(-1).clamp_min(tiny)
            w, info = torch.linalg.solve_ex(Hh + (ridge * scale)[:, None, None] * eye[:h, :h],
                                            Hh.new_ones(Hh.shape[0], h, 1))
            alpha = (w / w.sum(1, keepdim=True)).transpose(1, 2)      # (a, 1, h), Σα = 1
            new = (alpha @ F[:, :h]).squeeze(1)
            if damping != 1:
                new = damping * new + (1 - damping) * (alpha @ X[:, :h]).squeeze(1)
            ok = (info == 0) & torch.isfinite(new).all(-1)           # else: the plain step
            x = torch.where(ok.unsqueeze(1), new, x + damping * res)
        if keep is not None:
            x, X, F, R, H = x[keep], X[keep], F[keep], R[keep], H[keep]
    else:
        t.finish(x, _residual(g, x, t.rows)[1], max_iter + 1)
    t.iters.clamp_(max=max_iter)
    return t


def direct(W: Tensor, x: Tensor) -> Solution:
    """Exact fixed point of the linear network r = W r + x (f = identity): one LU solve of
    (I − W) rᵢ = xᵢ for all samples. Residual is measured, not assumed."""
    eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    r = torch.linalg.solve(eye - W, x.T).T
    res = (r @ W.T + x - r).abs().amax(1)
    ok = torch.isfinite(res)
    return Solution(r, torch.ones_like(res, dtype=torch.long), res, ok, None, "direct")


def jacobian(g: StateMap, u: Tensor, rows: Tensor | None = None) -> Tensor:
    """Per-sample Jacobians ∂g(u_i)/∂u_i (m, N, N) of a row-wise map, by forward-mode autograd:
    sample i's row depends on u_i alone, so one product with the k-th unit vector in every row
    gives column k of all m Jacobians."""
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)

    def column(e: Tensor) -> Tensor:
        return torch.func.jvp(lambda v: g(v, rows), (u,), (e.expand_as(u),))[1]

    with warnings.catch_warnings():
        # torch's first forward-mode call loads its own decompositions through torch.jit.script,
        # which torch itself deprecates: a warning about torch's internals, not about this code
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning)
        return torch.func.vmap(column, out_dims=2)(eye)


def _time_scale(tau: Tensor | None, u: Tensor) -> Tensor:
    """Per-unit τ_i / τ_min (ones without time constants): the pseudo-time step is in units of
    the fastest unit's τ."""
    if tau is None:
        return torch.ones(u.shape[1], dtype=u.dtype, device=u.device)
    tau = tau.to(u.dtype)
    return tau / tau.min()


def ptc(g: StateMap, u0: Tensor, *, tol: float = 1e-5, max_iter: int = 300, dt: float = 0.5,
        accuracy: float = 0.1, tau: Tensor | None = None,
        jac: Callable[[Tensor, "Tensor | None"], Tensor] | None = None) -> Solution:
    """Pseudo-transient continuation of the dynamics T du/dt = −u + g(u) (T = diag τ, eq 2.1):
    linearly implicit Euler steps (T/h − J) Δ = F(u), F = g(u) − u, J = ∂F/∂u, with a
    per-sample step h (in units of the fastest τ, first ``dt``) under error control: a step is
    taken only if its local error, estimated as (h/2) ‖T⁻¹(F(u + Δ) − F(u))‖∞, is at most
    ``accuracy``, and h is rescaled by √(accuracy/error) (between ×0.2 and ×5) after every try.

    While the state moves, the error bounds h and the steps follow the trajectory, so the sample
    ends at the equilibrium its dynamics reach from ``u0`` (an input can have several). As it
    comes to rest F stops changing, h grows without bound and the steps become Newton's, which
    converge fast also where that equilibrium attracts only weakly (max Re λ(G W) near 1) or the
    plain map expands (ρ(G W) > 1), where iteration and Anderson mixing stall. Implicit Euler is
    stable for every h, so fast modes cost nothing.

    Newton's method converges to unstable equilibria too, which the dynamics never reach: a
    sample that lands on one (max Re λ(T⁻¹ J) ≥ 0) is reported ``UNSTABLE``, not converged.
    ``jac(u, rows)``: the Jacobians ∂g/∂u (a, N, N) (``Dynamics.state_jacobian``, O(N²) a sample);
    without it they come from autograd ([`jacobian`][fprnn.core.solvers.jacobian], O(N³)). Each try costs a Jacobian, an
    LU and an evaluation of g per sample, O(N³): this is a solver for the few samples the
    accelerated ones leave ([`settle`][fprnn.core.solvers.settle]), not for whole batches of large networks. ``iters``
    counts tries, rejected ones included."""
    _check_positive("tol", tol)
    _check_positive("max_iter", max_iter, integer=True)
    _check_positive("dt", dt)
    _check_positive("accuracy", accuracy)
    t = _Tracker(u0, tol)
    unstable = torch.zeros_like(t.converged)
    scale = _time_scale(tau, u0)
    eye = torch.eye(u0.shape[1], dtype=u0.dtype, device=u0.device)
    tiny = torch.finfo(u0.dtype).tiny
    x = u0
    gx, res = _residual(g, x, None)
    F = gx - x
    h = torch.full((u0.shape[0],), float(dt), dtype=u0.dtype, device=u0.device)
    for k in range(int(max_iter)):
        J = (jacobian(g, x, t.rows) if jac is None else jac(x, t.rows)) - eye
        at_rest = t.live & (res <= tol)
        if bool(at_rest.any()):
            lam = torch.linalg.eigvals(J[at_rest] / scale.unsqueeze(-1)).real.amax(-1)
            unstable[t._orig(at_rest.nonzero().squeeze(1)[lam >= 0])] = True
        keep = t.update(x, res, k)
        if t.done:
            break
        if keep is not None:
            x, F, res, h, J = x[keep], F[keep], res[keep], h[keep], J[keep]
        step, info = torch.linalg.solve_ex(torch.diag_embed(scale / h.unsqueeze(-1)) - J, F.unsqueeze(-1))
        trial = x + step.squeeze(-1)
        g_trial, res_trial = _residual(g, trial, t.rows)
        F_trial = g_trial - trial
        error = 0.5 * h * ((F_trial - F) / scale).abs().amax(1)
        ok = (info == 0) & torch.isfinite(res_trial) & (error <= accuracy)
        x = torch.where(ok.unsqueeze(1), trial, x)
        F = torch.where(ok.unsqueeze(1), F_trial, F)
        res = torch.where(ok, res_trial, res)
        grow = (0.9 * (accuracy / error.clamp_min(tiny)).sqrt()).clamp(0.2, 5.0)
        # bounded: at h = ∞ every error estimate is ∞·0 and every try would be refused
        h = (h * torch.where((info == 0) & torch.isfinite(error), grow, torch.full_like(h, 0.2))).clamp(1e-6 * dt, 1e12)
    else:
        t.finish(x, res, int(max_iter))
    sol = t.solution("ptc")
    sol.converged &= ~unstable
    sol.status = torch.where(unstable, UNSTABLE, sol.status)
    return sol


def follow_euler(g: StateMap, u0: Tensor, *, tol: float = 1e-5, dt: float = 0.05, steps: int = 20000,
                 tau: Tensor | None = None) -> Solution:
    """Forward Euler of T du/dt = −u + g(u) with step ``dt`` in units of the fastest τ, stopping
    each sample at ``tol``: the dynamics themselves, slowly (a sample with max Re λ(G W) = 0.97
    needs thousands of steps). The reference [`ptc`][fprnn.core.solvers.ptc] is checked against."""
    return euler(g, u0, dt=dt / _time_scale(tau, u0) if tau is not None else dt, steps=steps, tol=tol)


def follow_rk23(g: StateMap, u0: Tensor, *, tol: float = 1e-5, dt: float = 0.5, steps: int = 2000,
                accuracy: float = 0.01, tau: Tensor | None = None) -> Solution:
    """The dynamics T du/dt = −u + g(u) by explicit Runge–Kutta steps under error control,
    stopping each sample at ``tol``: Bogacki–Shampine's 3(2) pair (the integrator of MATLAB's
    ode23 and SciPy's RK23), a per-sample step h in units of the fastest τ (first ``dt``). A try
    is taken only if its local error — the gap between the 3rd- and 2nd-order solutions (∞-norm) —
    is at most ``accuracy`` times the step's own move; h is rescaled by 0.9 (accuracy/error)^(1/3)
    (between ×0.2 and ×5) after every try. Relative, not absolute: near rest an absolute bound
    lets a fast mode ring undamped at the edge of stability once its amplitude is near the bound
    (the residual stalls), while the relative one keeps every mode resolved.

    While the state moves, the error bounds h and the steps follow the trajectory, so a sample
    ends at the equilibrium its dynamics reach from ``u0``. Near rest the relative error keeps h
    where the fastest modes are still resolved (and damped), so a weakly attracting equilibrium
    (max Re λ(G W) near 1) takes time ∝ 1/(1 − max Re λ): slower than [`ptc`][fprnn.core.solvers.ptc]'s Newton steps
    there, but matrix-free — three evaluations of g a try (the last one is the next
    try's first), no Jacobian, no N×N system: the fallback for networks too large for [`ptc`][fprnn.core.solvers.ptc]
    (a conv layer, fprnn.models.conv). Like the dynamics it never settles on an unstable equilibrium:
    such a sample, or a limit cycle, runs out of ``steps`` (tries) and is reported so. ``iters``
    counts evaluations of g."""
    _check_positive("tol", tol)
    _check_positive("dt", dt)
    _check_positive("steps", steps, integer=True)
    _check_positive("accuracy", accuracy)
    t = _Tracker(u0, tol)
    scale = _time_scale(tau, u0)
    tiny = torch.finfo(u0.dtype).tiny

    def rate(x: Tensor) -> tuple[Tensor, Tensor]:
        gx, res = _residual(g, x, t.rows)
        return (gx - x) / scale, res

    x = u0
    k1, res = rate(x)
    h = torch.full((u0.shape[0],), float(dt), dtype=u0.dtype, device=u0.device)
    evals = 1
    for _ in range(int(steps)):
        keep = t.update(x, res, evals)
        if t.done:
            break
        if keep is not None:
            x, k1, res, h = x[keep], k1[keep], res[keep], h[keep]
        H = h.unsqueeze(1)
        k2, _ = rate(x + 0.5 * H * k1)
        k3, _ = rate(x + 0.75 * H * k2)
        y = x + H * (2 / 9 * k1 + 1 / 3 * k2 + 4 / 9 * k3)
        k4, res_y = rate(y)
        evals += 3
        error = (H * (-5 / 72 * k1 + 1 / 12 * k2 + 1 / 9 * k3 - 1 / 8 * k4)).abs().amax(1) \
            / (y - x).abs().amax(1).clamp_min(tiny)
        ok = torch.isfinite(res_y) & (error <= accuracy)
        x, k1, res = torch.where(ok[:, None], y, x), torch.where(ok[:, None], k4, k1), torch.where(ok, res_y, res)
        grow = (0.9 * (accuracy / error.clamp_min(tiny)) ** (1 / 3)).clamp(0.2, 5.0)
        # a non-finite try (the state blew up within it) shrinks the step as a failed one does
        h = (h * torch.where(torch.isfinite(error), grow, torch.full_like(h, 0.2))).clamp(max=1e6)
    else:
        t.finish(x, res, evals)
    return t.solution("rk23")


#: The fallback a network gets unless told otherwise (model.fallback).
DEFAULT_FALLBACK = {"method": "ptc", "max_iter": 300, "dt": 0.5, "accuracy": 0.1, "max_share": 0.05}
#: the default where W is only ever applied, never formed (a conv layer): the rate dynamics by
#: error-controlled Runge–Kutta steps (up to 500 tries, 1,501 evaluations a sample) for at most a
#: tenth of a batch; ptc's per-sample N×N Jacobians are not to be had there
MATRIX_FREE_DEFAULT_FALLBACK = {"method": "rk23", "dt": 0.5, "steps": 500, "accuracy": 0.01, "max_share": 0.1}

#: How [`settle`][fprnn.core.solvers.settle] follows the dynamics: method name → function(g, u0, tol=, tau=, **options).
FALLBACKS: dict[str, Callable[..., Solution]] = {"ptc": ptc, "euler": follow_euler, "rk23": follow_rk23}


def resolve_fallback(spec, *, matrix_free: bool = False) -> dict | None:
    """What a layer's ``fallback`` argument means: ``"default"`` → the default for its kind of W
    (``DEFAULT_FALLBACK``, or ``MATRIX_FREE_DEFAULT_FALLBACK`` where W is never formed), None → off,
    a dict → itself; checked ([`check_fallback`][fprnn.core.solvers.check_fallback])."""
    if isinstance(spec, str) and spec == "default":
        spec = dict(MATRIX_FREE_DEFAULT_FALLBACK if matrix_free else DEFAULT_FALLBACK)
    return check_fallback(spec)


def check_fallback(spec) -> dict | None:
    """A fallback setting: None (off), or {"method": one of FALLBACKS, its options…}. Checked on a
    1×1 problem, so that a bad option fails now, not in the middle of training."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("method") not in FALLBACKS:
        raise ValueError(f"fallback must be null or {{method: one of {sorted(FALLBACKS)}, options…}}, got {spec!r}")
    share = spec.get("max_share", 1.0)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise ValueError(f"fallback max_share must be a fraction in (0, 1], got {share!r}")
    options = {k: v for k, v in spec.items() if k not in ("method", "max_share")}
    fn = FALLBACKS[spec["method"]]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("g", "u0", "tol", "tau", "jac")]
    allowed.append("max_share")
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"fallback {spec['method']!r} has no option(s) {bad}; its options are {allowed}")
    fn(lambda u, rows=None: 0 * u, torch.zeros(1, 1), **options)
    return dict(spec)


def follow(g: StateMap, u0: Tensor, *, tol: float, method: str = "ptc", tau: Tensor | None = None,
           jac: Callable | None = None, **options) -> Solution:
    """The fixed point the dynamics reach from ``u0``, by ``method`` (`FALLBACKS`) with its
    ``options``; ``jac`` (the map's Jacobians) goes to the methods that take it ([`ptc`][fprnn.core.solvers.ptc])."""
    fn = FALLBACKS[method]
    if jac is not None and "jac" in inspect.signature(fn).parameters:
        options["jac"] = jac
    return fn(g, u0, tol=tol, tau=tau, **options)


def how_to_follow(fallback: dict) -> dict:
    """The [`follow`][fprnn.core.solvers.follow] options in a fallback setting: all but [`settle`][fprnn.core.solvers.settle]'s ``max_share``."""
    return {k: v for k, v in fallback.items() if k != "max_share"}


def settle(g: StateMap, u0: Tensor, first: Solution, *, jac: Callable | None = None, max_share: float = 1.0,
           **how) -> Solution:
    """``first`` with the samples it left unconverged solved again from their start ``u0`` by
    [`follow`][fprnn.core.solvers.follow] (``how``: method, tau, options) to ``first``'s tolerance. From the start, not
    from where ``first`` gave up: an input can have several attracting fixed points, and the
    network's is the one its dynamics reach from where they start. ``fallback`` marks the samples
    handed over, ``fallback_iters`` their steps (also added to ``iters``); ``status`` says why a
    sample is still unconverged. Only while at most ``max_share`` of the batch is left: the
    fallback costs far more than the solver (ptc O(N³) a sample and step; rk23 hundreds of
    evaluations where the solver takes tens), and a network that leaves more than that has lost
    its fixed points (chaotic dynamics, as a random network's with gain above 1), which following
    the dynamics would only confirm at great cost — those samples stay as ``first`` left them."""
    redo = ~first.converged
    if first.tol is None or not bool(redo.any()) or float(redo.float().mean()) > max_share:
        return first
    idx = redo.nonzero().squeeze(1)

    def g_sub(u, rows=None):
        return g(u, idx if rows is None else idx[rows])

    def jac_sub(u, rows=None):
        return jac(u, idx if rows is None else idx[rows])

    sub = follow(g_sub, u0[idx], tol=first.tol, jac=None if jac is None else jac_sub, **how)
    out = Solution(first.u.clone(), first.iters.clone(), first.residual.clone(), first.converged.clone(),
                   first.tol, f"{first.solver}+{sub.solver}", first.status.clone(),
                   redo, torch.zeros_like(first.iters))
    out.u[idx], out.residual[idx], out.converged[idx], out.status[idx] = sub.u, sub.residual, sub.converged, sub.status
    out.iters[idx] += sub.iters
    out.fallback_iters[idx] = sub.iters
    return out


#: Solvers that work on any map g(u, rows); ``direct`` needs the linear model (see model.py).
SOLVERS: dict[str, Callable[..., Solution]] = {"anderson": anderson, "iterate": iterate, "euler": euler}
ALL_SOLVERS = sorted([*SOLVERS, "direct"])
