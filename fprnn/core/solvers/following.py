"""Following the network's dynamics to the fixed point they reach from a start: pseudo-transient
continuation ([`ptc`][fprnn.core.solvers.following.ptc]), forward Euler, error-controlled Runge–Kutta; and
[`settle`][fprnn.core.solvers.following.settle], the fallback that hands a solver's unconverged samples to them, so
that a solver's failure is not mistaken for the network's."""
from __future__ import annotations

import inspect
import warnings
from typing import Callable

import torch

from fprnn.core.checks import positive, positive_int
from fprnn.core.dynamics import StateMap
from fprnn.core.solvers.iteration import euler
from fprnn.core.solvers.solution import UNSTABLE, Solution, Tracker, residual

Tensor = torch.Tensor


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
    without it they come from autograd ([`jacobian`][fprnn.core.solvers.following.jacobian], O(N³)). Each try costs a Jacobian, an
    LU and an evaluation of g per sample, O(N³): this is a solver for the few samples the
    accelerated ones leave ([`settle`][fprnn.core.solvers.following.settle]), not for whole batches of large networks. ``iters``
    counts tries, rejected ones included."""
    positive("tol", tol)
    positive_int("max_iter", max_iter)
    positive("dt", dt)
    positive("accuracy", accuracy)
    t = Tracker(u0, tol)
    unstable = torch.zeros_like(t.converged)
    scale = _time_scale(tau, u0)
    eye = torch.eye(u0.shape[1], dtype=u0.dtype, device=u0.device)
    tiny = torch.finfo(u0.dtype).tiny
    x = u0
    gx, res = residual(g, x, None)
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
        g_trial, res_trial = residual(g, trial, t.rows)
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
    needs thousands of steps). The reference [`ptc`][fprnn.core.solvers.following.ptc] is checked against."""
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
    (max Re λ(G W) near 1) takes time ∝ 1/(1 − max Re λ): slower than [`ptc`][fprnn.core.solvers.following.ptc]'s Newton steps
    there, but matrix-free — three evaluations of g a try (the last one is the next
    try's first), no Jacobian, no N×N system: the fallback for networks too large for [`ptc`][fprnn.core.solvers.following.ptc]
    (a conv layer, fprnn.models.conv). Like the dynamics it never settles on an unstable equilibrium:
    such a sample, or a limit cycle, runs out of ``steps`` (tries) and is reported so. ``iters``
    counts evaluations of g."""
    positive("tol", tol)
    positive("dt", dt)
    positive_int("steps", steps)
    positive("accuracy", accuracy)
    t = Tracker(u0, tol)
    scale = _time_scale(tau, u0)
    tiny = torch.finfo(u0.dtype).tiny

    def rate(x: Tensor) -> tuple[Tensor, Tensor]:
        gx, res = residual(g, x, t.rows)
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

#: How [`settle`][fprnn.core.solvers.following.settle] follows the dynamics: method name → function(g, u0, tol=, tau=, **options).
FALLBACKS: dict[str, Callable[..., Solution]] = {"ptc": ptc, "euler": follow_euler, "rk23": follow_rk23}


def resolve_fallback(spec, *, matrix_free: bool = False) -> dict | None:
    """What a layer's ``fallback`` argument means: ``"default"`` → the default for its kind of W
    (``DEFAULT_FALLBACK``, or ``MATRIX_FREE_DEFAULT_FALLBACK`` where W is never formed), None → off,
    a dict → itself; checked ([`check_fallback`][fprnn.core.solvers.following.check_fallback])."""
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
    ``options``; ``jac`` (the map's Jacobians) goes to the methods that take it ([`ptc`][fprnn.core.solvers.following.ptc])."""
    fn = FALLBACKS[method]
    if jac is not None and "jac" in inspect.signature(fn).parameters:
        options["jac"] = jac
    return fn(g, u0, tol=tol, tau=tau, **options)


def how_to_follow(fallback: dict) -> dict:
    """The [`follow`][fprnn.core.solvers.following.follow] options in a fallback setting: all but [`settle`][fprnn.core.solvers.following.settle]'s ``max_share``."""
    return {k: v for k, v in fallback.items() if k != "max_share"}


def settle(g: StateMap, u0: Tensor, first: Solution, *, jac: Callable | None = None, max_share: float = 1.0,
           **how) -> Solution:
    """``first`` with the samples it left unconverged solved again from their start ``u0`` by
    [`follow`][fprnn.core.solvers.following.follow] (``how``: method, tau, options) to ``first``'s tolerance. From the start, not
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
