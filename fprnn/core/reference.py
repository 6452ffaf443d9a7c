"""Per-sample reference implementations, written from the printed equations with explicit N×N
matrices and inverses, one sample at a time in a Python loop (like the authors' code).

They are slow on purpose: tests compare the batched rules against them and the benchmark
times them. Same conventions as [`fprnn.core.rules`][fprnn.core.rules] (rows = samples, mean over samples)."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def _eye(W):
    return torch.eye(W.shape[0], dtype=W.dtype, device=W.device)


def w1(W, r, gain, grad_r, lr):
    """eq 2.6: ΔW1_i = −η G_i [I − G_i W]^{−T} δ_i r_iᵀ."""
    I, out = _eye(W), torch.zeros_like(W)
    for ri, gi, di in zip(r, gain, grad_r):
        G = torch.diag(gi)
        out -= lr * G @ torch.linalg.inv(I - G @ W).T @ torch.outer(di, ri)
    return out / r.shape[0]


def w2(W, r, gain, grad_r, lr):
    """eq 2.17 as printed (needs every gain ≠ 0):
    ΔW2_i = −[[I − G W]⁻¹ G − η G² δ rᵀ [I − G W]ᵀ G]⁻¹ + [G⁻¹ − W]."""
    I, out = _eye(W), torch.zeros_like(W)
    for ri, gi, di in zip(r, gain, grad_r):
        G = torch.diag(gi)
        M = torch.linalg.inv(I - G @ W) @ G - lr * G @ G @ torch.outer(di, ri) @ (I - G @ W).T @ G
        out += -torch.linalg.inv(M) + torch.linalg.inv(G) - W
    return out / r.shape[0]


def w3(W, r, gain, grad_r, lr):
    """eq 2.19: ΔW3_i = −η [I − W G] G δ rᵀ [I − G W]ᵀ [I − G W]."""
    I, out = _eye(W), torch.zeros_like(W)
    for ri, gi, di in zip(r, gain, grad_r):
        G = torch.diag(gi)
        out -= lr * (I - W @ G) @ G @ torch.outer(di, ri) @ (I - G @ W).T @ (I - G @ W)
    return out / r.shape[0]


def w4(W, r, gain, grad_r, lr):
    """The authors' code: ΔW4_i = −η [I − W G] δ rᵀ [I − W G]ᵀ [I − W G]."""
    I, out = _eye(W), torch.zeros_like(W)
    for ri, gi, di in zip(r, gain, grad_r):
        G = torch.diag(gi)
        out -= lr * (I - W @ G) @ torch.outer(di, ri) @ (I - W @ G).T @ (I - W @ G)
    return out / r.shape[0]


def w2_linear_batch(W, X, grad_r, lr):
    """eq 3.8 with samples as rows: ΔW2 = [I − W] − ([I − W]⁻¹ − (η/m) Dᵀ X)⁻¹
    (D = grad_r; for MSE D = 2(R − Y) and this is the printed eq 3.8)."""
    I, m = _eye(W), X.shape[0]
    return (I - W) - torch.linalg.inv(torch.linalg.inv(I - W) - (lr / m) * grad_r.T @ X)


def jfb(W, r, gain, grad_r, lr):
    """Jacobian-free: ΔW_i = −η G_i δ_i r_iᵀ."""
    out = torch.zeros_like(W)
    for ri, gi, di in zip(r, gain, grad_r):
        out -= lr * torch.diag(gi) @ torch.outer(di, ri)
    return out / r.shape[0]
