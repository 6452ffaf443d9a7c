"""A certificate of stability that costs a few products per sample, not an eigendecomposition.

A fixed point of the continuous dynamics with gains g_i (rate: J_i = T⁻¹(−I + G_i W); voltage:
T⁻¹(−I + W G_i); eq 2.3) is stable iff its stability value s_i = 1 + τ_min max Re λ(J_i) is < 1
([`fprnn.core.dynamics.Dynamics.stability`][fprnn.core.dynamics.Dynamics.stability]). Deciding that exactly takes the eigenvalues of a
nonsymmetric N×N matrix per sample; when every sample has its own gains (a continuous condition) that
is one eigendecomposition per sample, far more than the rest of a training step. This module gives
an upper bound on s_i from one symmetric eigendecomposition of W shared by the batch: where the bound
is < 1 the sample *is* stable, and only the samples it cannot decide need their eigenvalues.

Why it holds. For g_i ≥ 0, G_i W and W G_i have the eigenvalues of G_i^½ W G_i^½ (λ(AB) = λ(BA)),
and with T diagonal, T⁻¹(G W − I) is similar to T^-½ (G^½ W G^½ − I) T^-½. The real part of any
eigenvalue of a matrix is at most the largest eigenvalue of its symmetric part, and with
S = (W + Wᵀ)/2 = Σ_k λ_k u_k u_kᵀ, for every level c ≥ 0,

    G^½ S G^½ ≼ G^½ (c I + Σ_{λ_k > c} (λ_k − c) u_k u_kᵀ) G^½,

whose largest eigenvalue is at most b(c) = c·max_j g_j + Σ_{λ_k > c} (λ_k − c) u_kᵀ G u_k (a positive
semidefinite term is bounded by its trace). So b = min_c b(c) ≥ λ_max(G^½ S G^½) ≥ max Re λ(G W).
The levels c = λ_k₊ give every b(c) from prefix sums of u_kᵀ G_i u_k = (g_i @ (U∘U))_k: one (m, N)
by (N, N) product. Then s_i ≤ b_i with equal time constants, and s_i ≤ 1 + (τ_min/τ_max)(b_i − 1)
when b_i ≤ 1 and they differ (T^-½ K T^-½ ≼ (b − 1) T⁻¹ for K ≼ (b − 1) I). The bound is tight
when W is nearly symmetric and loose when W is far from normal, which is where the exact
eigenvalues are still taken.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


@torch.no_grad()
def stability_bound(W: Tensor, gain: Tensor, tau: Tensor | None = None) -> Tensor:
    """An upper bound (m,) on each sample's stability value s_i (continuous rate or voltage
    dynamics), in float64; s_i < 1 (stable) wherever the bound is < 1. ``gain`` (m, N) are the
    gains f'(z_i) at the fixed points, ``tau`` (N,) per-unit time constants or None. A sample with
    a negative gain gets +inf (the bound needs G^½; its eigenvalues decide it)."""
    if W.dim() != 2 or W.shape[0] != W.shape[1] or gain.dim() != 2 or gain.shape[1] != W.shape[0]:
        raise ValueError(f"W must be (N, N) and gain (m, N); got W {tuple(W.shape)}, gain {tuple(gain.shape)}")
    W, g = W.detach().double(), gain.detach().double()
    lam, U = torch.linalg.eigh((W + W.T) / 2)
    lam = lam.flip(0).clamp_min(0)                      # descending; S ≼ S₊ keeps every term ≥ 0
    q = g.clamp_min(0) @ U.flip(1).square()             # (m, N): u_kᵀ G_i u_k
    zero = q.new_zeros(len(q), 1)
    above = torch.cat([zero, (lam * q).cumsum(1)], 1)   # Σ_{k<j} λ_k q_k, j = 0..N
    mass = torch.cat([zero, q.cumsum(1)], 1)            # Σ_{k<j} q_k
    level = torch.cat([lam, lam.new_zeros(1)])          # c_j: the j-th largest λ₊, then 0
    g_max = g.amax(1, keepdim=True).clamp_min(0)
    bound = (level * g_max + above - level * mass).amin(1)
    if tau is not None:
        tau = tau.detach().double()
        ratio = tau.min() / tau.max()
        bound = torch.where(bound <= 1, 1 + ratio * (bound - 1), bound)
    return torch.where(g.amin(1) < 0, torch.full_like(bound, float("inf")), bound)
