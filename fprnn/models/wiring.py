"""The wiring of an excitatory/inhibitory layer (docs/concepts/constraints.md): which units are
excitatory, which connections exist, the initial W that respects both, and per-unit time constants."""
from __future__ import annotations

import math

import torch

from fprnn.core import constraints

Tensor = torch.Tensor


def wiring(N: int, gen: torch.Generator, n_exc, p_connect, mask_path, self_connections: bool, constraint: str):
    """Cell types and connectivity of an N-unit layer: ``sign`` (+1 for the first ``n_exc`` units,
    excitatory, −1 for the rest; None without n_exc) and the ``mask`` of allowed connections (from
    ``mask_path``, or random with ``p_connect``, or None: all), the diagonal emptied without
    ``self_connections``."""
    if constraint not in constraints.METHODS:
        raise ValueError(f"unknown constraint {constraint!r}; choose one of {list(constraints.METHODS)}")
    if p_connect is not None and mask_path is not None:
        raise ValueError(f"give p_connect or mask_path, not both (got {p_connect!r} and {mask_path!r})")
    sign = None if n_exc is None else constraints.cell_types(N, n_exc)
    if mask_path is not None:
        mask = constraints.load_mask(mask_path, N)
        if not self_connections:
            mask.fill_diagonal_(False)
    elif p_connect is not None or not self_connections:
        mask = constraints.random_mask(N, 1.0 if p_connect is None else p_connect, gen, self_connections)
    else:
        mask = None
    return sign, mask


def constrained_init(Z: Tensor, sign: Tensor | None, mask: Tensor | None, blocks) -> Tensor:
    """|Z| with each column's sign and the mask; a unit's mean total weight from each population is
    the block's magnitude (a number: the same for all four blocks)."""
    N = Z.shape[0]
    s = torch.ones(N, dtype=Z.dtype) if sign is None else sign.to(Z.dtype)
    M = torch.ones(N, N, dtype=torch.bool) if mask is None else mask
    J = torch.as_tensor(blocks, dtype=Z.dtype)
    if J.dim() == 0:
        J = J.expand(2, 2)
    if tuple(J.shape) != (2, 2) or not bool(torch.isfinite(J).all() and (J >= 0).all()):
        raise ValueError(f"blocks must be a non-negative number or [[J_EE, J_EI], [J_IE, J_II]], got {blocks!r}")
    exc = s > 0
    pop = [exc, ~exc]
    W = torch.zeros(N, N, dtype=Z.dtype)
    half_normal_mean = math.sqrt(2 / math.pi)
    for a in range(2):
        for b in range(2):
            rows, cols = pop[a], pop[b]
            if not (rows.any() and cols.any()):
                continue
            blk = M[rows][:, cols]
            fan = blk.sum(1, keepdim=True).clamp_min(1).to(Z.dtype)      # each unit's inputs from b
            ri, ci = rows.nonzero().squeeze(1), cols.nonzero().squeeze(1)
            W[ri[:, None], ci[None, :]] = J[a, b] * Z[ri[:, None], ci[None, :]].abs() * blk / (half_normal_mean * fan)
    return W * s * M


def time_constants(N: int, tau, tau_I, sign: Tensor | None, dyn, dt: torch.dtype) -> Tensor | None:
    """Per-unit τ: ``tau`` for every unit (or the excitatory ones) and ``tau_I`` for inhibitory ones."""
    if tau is None and tau_I is None:
        return None
    if not dyn.continuous:
        raise ValueError(f"time constants (tau={tau!r}, tau_I={tau_I!r}) need continuous dynamics, "
                         f"not {dyn.name!r}")
    for name, v in (("tau", tau), ("tau_I", tau_I)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not math.isfinite(v) or v <= 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}")
    if tau_I is not None and sign is None:
        raise ValueError("tau_I is the inhibitory units' time constant: set n_exc too")
    t = torch.full((N,), 1.0 if tau is None else float(tau), dtype=dt)
    if tau_I is not None:
        t[sign < 0] = float(tau_I)
    return t
