"""Iteration and its accelerations: plain or damped fixed-point iteration (the discrete network
itself), forward Euler of the continuous one, and safeguarded Anderson mixing."""
from __future__ import annotations

import torch

from fprnn.core.checks import positive, positive_int
from fprnn.core.dynamics import StateMap
from fprnn.core.solvers.solution import Solution, Tracker, residual

Tensor = torch.Tensor


def iterate(g: StateMap, u0: Tensor, *, tol: float | None = 1e-5, max_iter: int = 500,
            damping: float = 1.0) -> Solution:
    """(Damped) fixed-point iteration u ← (1 − α) u + α g(u), α = ``damping``.

    With α = 1 this is the discrete network (eq 2.4); with α = dt/τ it is forward Euler of the
    continuous one (eq 2.1), which converges wherever the fixed point is stable for the continuous
    dynamics and α is small enough, also where the plain map oscillates."""
    if tol is not None:
        positive("tol", tol)
    positive_int("max_iter", max_iter)
    if not (isinstance(damping, (int, float)) and 0 < damping <= 1):
        raise ValueError(f"damping must be in (0, 1], got {damping!r}")
    return _iterate(g, u0, tol, int(max_iter), float(damping), evals=True).solution("iterate")


def _iterate(g, u0, tol, n, damping, evals, stall: float = 0.0, window: int = 5):
    """Damped iteration; with ``stall`` > 0, every ``window`` steps a sample whose residual has
    not shrunk by that factor since the last check leaves the loop (flagged in ``t.stalled``)."""
    t = Tracker(u0, tol)
    x, last = u0, None
    for k in range(n):
        gx, res = residual(g, x, t.rows)
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
        t.finish(x, residual(g, x, t.rows)[1], n + 1 if evals else n)
    return t


def euler(g: StateMap, u0: Tensor, *, dt: float = 0.01, steps: int = 500,
          tol: float | None = None) -> Solution:
    """Forward Euler of τ du/dt = −u + g(u) with step dt/τ = ``dt`` for ``steps`` steps;
    ``iters`` counts steps taken. ``dt`` may be a tensor (N,) of per-unit steps dt/τ_i.

    The paper's forward pass is dt/τ = 0.01 for 500 steps from r = 0 (section 3.2); it stops
    short of the fixed point, which the returned residual shows. With ``tol`` a sample stops
    early once its residual is ≤ tol."""
    positive_int("steps", steps)
    if tol is not None:
        positive("tol", tol)
    if isinstance(dt, Tensor):
        if not bool(torch.isfinite(dt).all() and (dt > 0).all() and (dt <= 1).all()):
            raise ValueError(f"every unit's dt/τ must be in (0, 1], got values in [{float(dt.min()):.3g}, "
                             f"{float(dt.max()):.3g}]")
    else:
        positive("dt", dt)
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
    positive("tol", tol)
    positive_int("max_iter", max_iter)
    positive_int("memory", memory)
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


def _anderson(g, u0, tol, max_iter, memory, damping, ridge) -> Tracker:
    t = Tracker(u0, tol)
    m, n = u0.shape
    X = u0.new_zeros(m, memory, n)           # past iterates u_k
    F = u0.new_zeros(m, memory, n)           # past g(u_k)
    R = u0.new_zeros(m, memory, n)           # past residuals g(u_k) − u_k
    H = u0.new_zeros(m, memory, memory)      # their Gram matrix, one new row per step
    eye = torch.eye(memory, dtype=u0.dtype, device=u0.device)
    tiny = torch.finfo(u0.dtype).tiny
    x = u0
    for k in range(max_iter):
        gx, rn = residual(g, x, t.rows)
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
        t.finish(x, residual(g, x, t.rows)[1], max_iter + 1)
    t.iters.clamp_(max=max_iter)
    return t
