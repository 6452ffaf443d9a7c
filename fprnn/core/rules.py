"""The weight-update rules of Zhu & Rosenbaum (2024) as batched tensor algebra.

Common signature ``rule(W, r, gain, grad_r, lr) -> dW``:
W (N, N) — or an operator ([`fprnn.core.operators`][fprnn.core.operators]: W through W r, Wᵀ p and the step on its
parameters, e.g. a convolution), whose dW is then the step on its parameters; r, gain = f'(z), grad_r = ∇_r L per sample are (m, N), rows = samples, with
z = r Wᵀ + x. The result is the mean over samples of the per-sample update, to be *added*:
W ← W + dW. Only w1 forms per-sample N×N matrices (``method="exact"``, or the samples
``method="auto"`` hands to LU).

With ``return_info=True`` a rule returns ``(dW, info)``; ``info`` holds what the caller needs to
judge the step (convergence of the adjoint, samples outside w2's domain) and the per-sample factors
it formed that a caller can reuse (``adjoint``: p_i; ``input_factor``: a_i).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from fprnn.core.checks import positive
from fprnn.core.operators import Dense, as_operator
from fprnn.core.solvers import anderson

Tensor = torch.Tensor


class DomainError(ValueError):
    """w2's exact step leaves the domain where the reparameterization is invertible."""


def _check(W, r: Tensor, gain: Tensor, grad_r: Tensor, lr):
    """W as an operator, once its arguments are checked."""
    op = as_operator(W)
    n = op.n
    for name, t in (("r", r), ("gain", gain), ("grad_r", grad_r)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[1] != n:
            raise ValueError(
                f"{name} must be (m, N) = (m, {n}) to match W (N = {n}), "
                f"got shape {tuple(getattr(t, 'shape', ()))}")
        if t.dtype != op.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but W has {op.dtype}; use one dtype")
        if t.device != op.device:
            raise ValueError(f"{name} is on {t.device} but W is on {op.device}")
    if not (r.shape[0] == gain.shape[0] == grad_r.shape[0]):
        raise ValueError(f"r, gain, grad_r must have the same number of rows, got shapes "
                         f"{tuple(r.shape)}, {tuple(gain.shape)}, {tuple(grad_r.shape)}")
    if r.shape[0] == 0:
        raise ValueError("the batch is empty (m = 0)")
    positive("lr", lr)
    return op


def _dense(op, what: str) -> Tensor:
    """W's matrix, for the forms that need one; an operator W has none to give."""
    if not isinstance(op, Dense):
        raise ValueError(f"{what} needs W as a matrix; W here is a {type(op).__name__} operator: "
                         f"use the per-sample rule (the products with W are all it takes)")
    return op.W


def _out(dW: Tensor, info: dict, return_info: bool):
    return (dW, info) if return_info else dW


# --- the factors of the reparameterized rules (derived in docs/concepts/rules.md) -------------------

def input_factor(W, gain: Tensor, grad_r: Tensor) -> Tensor:
    """Rows a_i = (I − W G_i) G_i δ_i: w2/w3's left factor, and the read-in's reparameterized
    step −η a_i s_iᵀ for an input s_i (gradient descent on the input map, pulled back: docs/concepts/stacks.md)."""
    gd = gain * grad_r
    return gd - as_operator(W)(gain * gd)


def factors(W, r: Tensor, gain: Tensor, grad_r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rows of a_i = (I − W G_i) G_i δ_i, c_i = (I − G_i W) r_i and b_i = (I − G_i W)ᵀ c_i,
    so that eq 2.19 reads ΔW3_i = −η a_i b_iᵀ. Cost: three products with W (two W r, one Wᵀ p)."""
    op = as_operator(W)
    A = input_factor(op, gain, grad_r)
    C = r - gain * op(r)
    B = C - op.T(gain * C)
    return A, B, C


def _kappa(A: Tensor, C: Tensor, gain: Tensor) -> Tensor:
    """κ_i = c_iᵀ G_i a_i, w2's per-sample denominator 1 − η κ_i (Sherman–Morrison)."""
    return (C * gain * A).sum(1)


METRICS = ("sample", "batch")


def w3(W, r, gain, grad_r, lr, *, metric: str = "sample", return_info: bool = False):
    """Linearized reparameterized rule, eq 2.19:
    ΔW3_i = −η (I − W G_i) G_i δ_i r_iᵀ (I − G_i W)ᵀ (I − G_i W), mean over samples.

    Each sample's step is steepest descent under that sample's metric: ΔW3_i = −η L_i ∇L_i R_i with
    L_i = (I − W G_i)(I − W G_i)ᵀ and R_i = (I − G_i W)ᵀ(I − G_i W), both positive definite
    (docs/concepts/rules.md). Their mean need not descend the batch loss (the cross terms ⟨∇L_j, L_i ∇L_i R_i⟩
    can be negative). ``metric="batch"`` takes steepest descent under the batch-averaged factors
    instead: ΔW = −η L̄ ∇L R̄, L̄ = mean L_i, R̄ = mean R_i, ∇L = mean ∇L_i — a descent direction
    for every batch, ⟨∇L, ΔW⟩ = −η ‖L̄^½ ∇L R̄^½‖² < 0; with one gain for all samples (the linear
    model) it is w3 itself. It needs the batch gradient, i.e. w1's implicit adjoint (its cost and
    its ``info``: ``adjoint``, ``singular``) and W as a matrix."""
    op = _check(W, r, gain, grad_r, lr)
    if metric not in METRICS:
        raise ValueError(f"unknown w3 metric {metric!r}; choose one of {list(METRICS)}")
    if metric == "sample":
        A, B, _ = factors(op, r, gain, grad_r)
        return _out(-(lr / r.shape[0]) * op.outer(A, B), {"input_factor": A}, return_info)
    W = _dense(op, "w3(metric='batch')")
    P, info = implicit_adjoint(W, gain, grad_r)
    info["adjoint"] = P
    if info.get("singular") and not return_info:
        raise ValueError(f"w3(metric='batch'): I − G_i W is singular for {info['singular']} samples")
    g1, g2 = gain.mean(0), (gain * gain).mean(0)
    WG = W * g1                                           # W Ḡ (columns scaled)
    L = torch.eye(len(W), dtype=W.dtype, device=W.device) - WG - WG.T + (W * g2) @ W.T
    GW = g1.unsqueeze(1) * W                              # Ḡ W (rows scaled)
    R = torch.eye(len(W), dtype=W.dtype, device=W.device) - GW - GW.T + W.T @ (g2.unsqueeze(1) * W)
    return _out(-lr * (L @ (P.T @ r / r.shape[0]) @ R), info, return_info)


def w2(W, r, gain, grad_r, lr, *, shared_gain: bool = False, return_info: bool = False):
    """Exact reparameterized rule, eq 2.17 (steepest descent under the metric of eq 2.12).

    The per-sample change of A = [G − G W G]⁻¹ (eq 2.16) is rank one, so by Sherman–Morrison
    ΔW2_i = −η a_i b_iᵀ / (1 − η κ_i), κ_i = c_iᵀ G_i a_i — no inverse, defined where gains are 0.

    ``shared_gain=True`` (linear model, G = I): the batch form of eq 3.8, one exact step of the
    batch-averaged ΔA, by Woodbury: ΔW2 = −(η/m) Aᵀ (I_m − (η/m) B Dᵀ)⁻¹ B (an m×m solve).

    A step that leaves the domain (1 − η κ_i ≤ 0, or a singular I_m − (η/m) B Dᵀ) raises
    [`DomainError`][fprnn.core.rules.DomainError]; with ``return_info=True`` it is reported as ``info["out_of_domain"]``
    instead and the returned dW is zero (never inf/NaN)."""
    op = _check(W, r, gain, grad_r, lr)
    m = r.shape[0]
    A, B, C = factors(op, r, gain, grad_r)
    if shared_gain:
        W = _dense(op, "w2(shared_gain=True)")
        if not bool((gain == 1).all()):
            raise ValueError("w2(shared_gain=True) is the linear model's batch rule (eq 3.8): "
                             "it needs gain ≡ 1 (identity activation)")
        K = torch.eye(m, dtype=W.dtype, device=W.device) - (lr / m) * (B @ grad_r.T)
        S, info_ = torch.linalg.solve_ex(K, B)
        dW = -(lr / m) * (A.T @ S)
        bad = int(info_ != 0) or not bool(torch.isfinite(dW).all())
        info = {"out_of_domain": int(bool(bad)), "min_denominator": float(torch.linalg.det(K)) if bad else None}
    else:
        denom = 1 - lr * _kappa(A, C, gain)
        out = denom <= 0
        n_out = int(out.sum())
        info = {"out_of_domain": n_out, "min_denominator": float(denom.min()), "input_factor": A}
        dW = -(lr / m) * op.outer(A / denom.clamp_min(torch.finfo(op.dtype).tiny).unsqueeze(1), B)
        if n_out == 0 and not bool(torch.isfinite(dW).all()):
            info["out_of_domain"] = n_out = m
    if info["out_of_domain"]:
        if not return_info:
            where = (f"{info['out_of_domain']} of {m} samples have 1 − η κ_i ≤ 0 "
                     f"(min {info['min_denominator']:.3g})" if not shared_gain
                     else "I_m − (η/m) B Dᵀ is singular")
            raise DomainError(f"w2 step with lr={lr} leaves the domain of the reparameterization: "
                              f"{where}; lower lr")
        dW = torch.zeros_like(dW)
    return _out(dW, info, return_info)


def w4(W, r, gain, grad_r, lr, *, return_info: bool = False):
    """The rule of the authors' published code (reparameterization A = [I − W G]⁻¹, eq 2.18):
    ΔW4_i = −η (I − W G_i) δ_i r_iᵀ (I − W G_i)ᵀ (I − W G_i)."""
    op = _check(W, r, gain, grad_r, lr)
    A4, B4 = _w4_factors(op, r, gain, grad_r)
    return _out(-(lr / r.shape[0]) * op.outer(A4, B4), {}, return_info)


def _w4_factors(op, r, gain, grad_r):
    """Rows A4_i = (I − W G_i) δ_i and B4_i = (I − W G_i)ᵀ (I − W G_i) r_i of w4's steps."""
    A4 = grad_r - op(gain * grad_r)
    C4 = r - op(gain * r)
    return A4, C4 - gain * op.T(C4)


def w1(W, r, gain, grad_r, lr, *, method: str = "auto", tol: float | None = None,
       max_iter: int | None = None, chunk: int = 32, return_info: bool = False):
    """Euclidean gradient descent, eq 2.6: ΔW1_i = −η G_i (I − G_i W)^{−T} δ_i r_iᵀ = −η p_i r_iᵀ,
    with p_i from [`implicit_adjoint`][fprnn.core.rules.implicit_adjoint] (its ``method``, ``tol``, ``max_iter`` and ``chunk``);
    ``info["adjoint"]`` holds the rows p_i (a stack reuses them for its read-in and credit).

    Without ``return_info`` a singular I − G_i W raises ValueError and an adjoint iteration that
    does not converge raises RuntimeError; with it, both are reported in ``info``."""
    op = _check(W, r, gain, grad_r, lr)
    P, info = implicit_adjoint(op, gain, grad_r, method=method, tol=tol, max_iter=max_iter, chunk=chunk)
    info["adjoint"] = P
    if not return_info:
        if info.get("singular"):
            raise ValueError(f"w1: I − G_i W is singular for {info['singular']} samples (the fixed "
                             f"point is not hyperbolic)")
        if info.get("converged") is False:
            raise RuntimeError(f"w1 adjoint iteration did not converge in {info['iters']} iterations; "
                               f"the map r ← f(Wr + x) is not contracting: use method='exact'")
    return _out(-(lr / r.shape[0]) * op.outer(P, r), info, return_info)


def implicit_adjoint(W, gain: Tensor, grad_r: Tensor, *, method: str = "auto",
                     tol: float | None = None, max_iter: int | None = None,
                     chunk: int = 32) -> tuple[Tensor, dict]:
    """Rows p_i = G_i (I − G_i W)^{−T} δ_i: the gradient of the loss with respect to the fixed
    point's input x_i (dL_i = p_iᵀ dx_i, since dr_i = (I − G_i W)⁻¹ G_i dx_i). It gives w1's step,
    the read-in's gradient and the credit passed down a stack of layers. Returns (P, info).

    p_i = g_i ⊙ u_i with (I − G_i W)ᵀ u_i = δ_i.

    - ``method="exact"``: batched LU solves, ``chunk`` samples at a time (O(m N³)); one solve
      when every sample has the same gains (the linear model);
    - ``method="adjoint"``: the iteration P ← G ⊙ (D + P W) (recurrent backprop), O(k m N²);
      it converges only while the discrete map is contracting: ``info["converged"]`` says so
      (stops when the change is ≤ tol·max|P|; defaults tol = 16 ε of the dtype, as ``auto`` —
      a fixed 1e-8 would be below float32's rounding and never be met — and max_iter=1000);
    - ``method="auto"`` (default): exact, to rounding, at the adjoint's cost where it can be —
      the adjoint iteration per sample until its change is ≤ tol·‖p_i‖∞ (default 16 ε of the
      dtype, max_iter 50), then batched LU for the samples that did not get there (slowly
      contracting or unstable fixed points: the samples w1 is about). ``info["exact_samples"]``
      counts those. With shared gains it is the single exact solve.
    ``info["singular"]`` counts samples whose I − G_i W is singular.

    W an operator (no matrix to factor): see [`operator_adjoint`][fprnn.core.rules.operator_adjoint]."""
    if method not in ("auto", "exact", "adjoint"):
        raise ValueError(f"unknown w1 method {method!r}; choose 'auto', 'exact' or 'adjoint'")
    op = as_operator(W)
    if not isinstance(op, Dense):
        if method == "exact":
            _dense(op, "the implicit adjoint's method='exact' (batched LU)")
        return operator_adjoint(op, gain, grad_r, tol=tol, max_iter=max_iter)
    W = op.W
    m, n = grad_r.shape
    info: dict = {}
    if method != "adjoint" and bool((gain == gain[:1]).all()):
        # one gain for all samples (e.g. the linear model, G = I): a single N×N solve
        g = gain[0]
        M = torch.eye(n, dtype=W.dtype, device=W.device) - W.T * g.unsqueeze(0)
        U, err = torch.linalg.solve_ex(M, grad_r.T)
        if int(err) != 0:
            info["singular"] = m
        P = g * U.T
    elif method != "adjoint":
        if method == "auto":    # LU only for the rows the adjoint iteration did not settle
            P, rows, _ = _adjoint_rows(W, gain, grad_r,
                                       tol=16 * torch.finfo(W.dtype).eps if tol is None else tol,
                                       max_iter=50 if max_iter is None else max_iter)
            info["exact_samples"] = int(rows.numel())
        else:
            P, rows = torch.empty_like(grad_r), torch.arange(m, device=grad_r.device)
        if rows.numel():
            P[rows], sing = _exact_rows(W, gain[rows], grad_r[rows], chunk)
            if sing:
                info["singular"] = sing
    else:  # adjoint
        tol = 16 * torch.finfo(W.dtype).eps if tol is None else tol
        max_iter = 1000 if max_iter is None else max_iter
        gd = gain * grad_r
        P = gd.clone()
        info["converged"] = False
        for k in range(1, max_iter + 1):
            P_new = gd + gain * (P @ W)
            delta = float((P_new - P).abs().max())
            P = P_new
            if not math.isfinite(delta):
                break
            if delta <= tol * (float(P.abs().max()) or 1.0):
                info["converged"] = True
                break
        info["iters"] = k
    return P, info


def operator_adjoint(op, gain: Tensor, grad_r: Tensor, *, tol: float | None = None,
                     max_iter: int | None = None) -> tuple[Tensor, dict]:
    """p_i = G_i (I − G_i W)^{−T} δ_i for W an operator, matrix-free: (I − G_i W)ᵀ has no LU here.
    First the adjoint iteration p ← g ⊙ (δ + Wᵀ p) per sample (cheap where the map contracts);
    the samples it does not settle within ``max_iter`` (default 50) go to Anderson acceleration
    of the same linear fixed point ([`fprnn.core.solvers.iteration.anderson`][fprnn.core.solvers.iteration.anderson]: secant steps, GMRES-like on a
    linear map; a memory of 10, as Anderson's usual 5 stalls on non-contracting cases such as
    ρ(G_i W) ≈ 1.1), which also solves slowly contracting and many non-contracting ones — each row
    scaled to max |g ⊙ δ| = 1 so that one tolerance is relative for all.

    Stops at a change ≤ ``tol``·max|p_i| (default 1000 ε of the dtype: 2e-13 in float64, 1e-4 in
    float32 — Anderson's residual has a rounding floor well above 16 ε). ``info["converged"]``
    is False, with ``info["unconverged"]`` samples, when some sample gets there by neither."""
    tol = 1000 * torch.finfo(op.dtype).eps if tol is None else tol
    max_iter = 50 if max_iter is None else max_iter
    P, rows, steps = _adjoint_rows(op, gain, grad_r, tol=tol, max_iter=max_iter)
    info: dict = {"iters": steps, "exact_samples": 0}      # iters: products with Wᵀ, slowest sample
    if rows.numel():
        gd = (gain * grad_r)[rows]
        scale = gd.abs().amax(1, keepdim=True).clamp_min(torch.finfo(op.dtype).tiny)
        g_rows, d_rows = gain[rows], gd / scale

        def linear(p, sub=None):
            g_, d_ = (g_rows, d_rows) if sub is None else (g_rows[sub], d_rows[sub])
            return d_ + g_ * op.T(p)

        sol = anderson(linear, d_rows, tol=tol, max_iter=4 * max_iter, memory=10, mix_above=0)
        P[rows] = sol.u * scale
        info["unconverged"] = int((~sol.converged).sum())
        info["iters"] = steps + int(sol.iters.max())
        info["anderson_samples"] = int(rows.numel())
    info["converged"] = not info.get("unconverged")
    return P, info


def _exact_rows(W: Tensor, gain: Tensor, grad_r: Tensor, chunk: int) -> tuple[Tensor, int]:
    """p_i = g_i ⊙ (I − G_i W)^{−T} δ_i by batched LU, ``chunk`` samples at a time; also the
    number of singular systems."""
    eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
    P = torch.empty_like(grad_r)
    singular = 0
    for s in range(0, gain.shape[0], chunk):
        g = gain[s:s + chunk]
        M = eye - W.T.unsqueeze(0) * g.unsqueeze(1)                  # (I − G_i W)ᵀ = I − Wᵀ G_i
        U, err = torch.linalg.solve_ex(M, grad_r[s:s + chunk].unsqueeze(-1))
        singular += int((err != 0).sum())
        P[s:s + chunk] = g * U.squeeze(-1)
    return P, singular


def _adjoint_rows(W, gain: Tensor, grad_r: Tensor, *, tol: float,
                  max_iter: int) -> tuple[Tensor, Tensor, int]:
    """The adjoint iteration p ← g ⊙ (δ + W ᵀp) per sample; converged rows leave the working
    set. Returns P (rows not converged hold their last iterate), the indices of those rows and
    the iterations taken (by the slowest row)."""
    WT = (lambda p: p @ W) if isinstance(W, Tensor) else W.T
    gd = gain * grad_r
    P = gd.clone()
    idx = torch.arange(gd.shape[0], device=gd.device)
    steps = 0
    while steps < max_iter and idx.numel():
        steps += 1
        p = P[idx]
        p_new = gd[idx] + gain[idx] * WT(p)
        change = (p_new - p).abs().amax(1)
        P[idx] = p_new
        done = change <= tol * p_new.abs().amax(1)                    # NaN/inf never count as done
        idx = idx[~done]
    return P, idx, steps


def angle(dWa: Tensor, dWb: Tensor) -> float:
    """θ_αβ = arccos(⟨ΔW_α, ΔW_β⟩_F / (‖ΔW_α‖_F ‖ΔW_β‖_F)) in degrees (section 3.1.6)."""
    if dWa.shape != dWb.shape:
        raise ValueError(f"angle needs equal shapes, got {tuple(dWa.shape)} and {tuple(dWb.shape)}")
    na, nb = torch.linalg.norm(dWa), torch.linalg.norm(dWb)
    if float(na) == 0 or float(nb) == 0:
        return float("nan")
    cos = (dWa * dWb).sum() / (na * nb)
    return math.degrees(math.acos(max(-1.0, min(1.0, float(cos)))))


def jfb(W, r, gain, grad_r, lr, *, return_info: bool = False):
    """Jacobian-free backpropagation, the cheap baseline of deep-equilibrium practice: w1 with the
    implicit factor (I − G_i W)^{−T} dropped, ΔW_i = −η G_i δ_i r_iᵀ. Not a gradient of the loss in
    general (it is when W = 0), but a descent direction while G_i W is small."""
    op = _check(W, r, gain, grad_r, lr)
    return _out(-(lr / r.shape[0]) * op.outer(gain * grad_r, r), {}, return_info)


def sample_step_norms(name: str, W: Tensor, r: Tensor, gain: Tensor, grad_r: Tensor, lr: float) -> Tensor:
    """‖ΔW_i‖_F of each sample's own step under rule ``name`` (m,): every rule's per-sample step is
    rank one, u_i v_iᵀ, so its norm is ‖u_i‖ ‖v_i‖ — w1: η p_i r_iᵀ; w2: η a_i b_iᵀ / (1 − ηκ_i)
    (the per-sample form, also for a linear layer); w3: η a_i b_iᵀ; w4: η A4_i B4_iᵀ; jfb:
    η (g_i ⊙ δ_i) r_iᵀ. The batch step is their mean; its spread (max / median) says how much a
    few samples dominate it."""
    op = _check(W, r, gain, grad_r, lr)
    if name == "w1":
        U, V = implicit_adjoint(op, gain, grad_r)[0], r
    elif name in ("w2", "w3"):
        U, V, C = factors(op, r, gain, grad_r)
        if name == "w2":
            U = U / (1 - lr * _kappa(U, C, gain)).abs().unsqueeze(1)
    elif name == "w4":
        U, V = _w4_factors(op, r, gain, grad_r)
    elif name == "jfb":
        U, V = gain * grad_r, r
    else:
        raise ValueError(f"unknown rule {name!r}; choose one of {sorted(RULES)}")
    return lr * torch.linalg.vector_norm(U, dim=1) * torch.linalg.vector_norm(V, dim=1)


#: name → rule, for configs and the training loop. ``bptt`` lives on the model (autograd).
RULES: dict[str, Callable] = {"w1": w1, "w2": w2, "w3": w3, "w4": w4, "jfb": jfb}


def get_rule(name: str) -> Callable:
    try:
        return RULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown rule {name!r}; choose one of {sorted(RULES)} (or 'bptt' for "
                         f"autograd through the unrolled solver)") from None
