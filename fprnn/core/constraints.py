"""Sign constraints (Dale's law) and connectivity masks on W that hold under every rule.

The rules compute a step ΔW in their own metric, not a gradient, so a constraint cannot be left
to autograd: it is a map from (W, the optimizer's proposed W + ΔW) to the next W (derivation in
docs/concepts/constraints.md). Columns are presynaptic: unit j's outgoing weights are column j of W.

- ``project``: W ← Π(W + M ⊙ ΔW): masked entries stay 0, an excitatory column's entries are
  clipped at 0 from below, an inhibitory column's from above. The clipped entries are counted.
- ``reparam``: W = S ⊙ M ⊙ exp(θ). The step is pulled back to θ through the Jacobian of the
  parameterization, Δθ = ΔW / W (so W ⊙ Δθ = ΔW: the rule's own step to first order, in its own
  metric), and W ← W ⊙ exp(Δθ): signs never change and zeros stay zero. |Δθ| is capped at
  ``max_log_step`` (a factor e per step), and the capped entries are counted.
"""
from __future__ import annotations

from pathlib import Path

import torch

Tensor = torch.Tensor
METHODS = ("project", "reparam")


def cell_types(N: int, n_exc: float | int) -> Tensor:
    """+1 for the first excitatory units, −1 for the rest. ``n_exc``: a fraction (a float in
    (0, 1]) or a count (an int)."""
    if isinstance(n_exc, float) and 0 < n_exc <= 1:
        n_e = round(n_exc * N)
    elif isinstance(n_exc, int) and not isinstance(n_exc, bool) and 0 < n_exc <= N:
        n_e = n_exc
    else:
        raise ValueError(f"n_exc must be a fraction in (0, 1] or a count 1..{N} of excitatory units, "
                         f"got {n_exc!r}")
    if n_e == 0:
        raise ValueError(f"n_exc={n_exc!r} gives no excitatory unit of N={N}")
    s = -torch.ones(N)
    s[:n_e] = 1
    return s


def random_mask(N: int, p_connect: float, gen: torch.Generator, self_connections: bool = True) -> Tensor:
    """A fixed Bernoulli(p_connect) mask (N, N), without the diagonal unless ``self_connections``."""
    if isinstance(p_connect, bool) or not isinstance(p_connect, (int, float)) or not 0 < p_connect <= 1:
        raise ValueError(f"p_connect must be a probability in (0, 1], got {p_connect!r}")
    M = torch.rand(N, N, generator=gen, dtype=torch.float64) < p_connect
    if not self_connections:
        M.fill_diagonal_(False)
    return M


def load_mask(path, N: int) -> Tensor:
    """A mask from a .npy or .pt file: N×N, nonzero = connection allowed."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"mask file {p}: not found")
    if p.suffix == ".npy":
        import numpy as np
        M = torch.from_numpy(np.load(p))
    elif p.suffix == ".pt":
        M = torch.load(p, map_location="cpu")
    else:
        raise ValueError(f"mask file {p}: expected .npy or .pt, got {p.suffix!r}")
    if not isinstance(M, Tensor) or tuple(M.shape) != (N, N):
        raise ValueError(f"mask file {p}: expected an ({N}, {N}) array, got shape {tuple(getattr(M, 'shape', ()))}")
    return M != 0


def violations(W: Tensor, sign: Tensor | None, mask: Tensor | None) -> int:
    """Entries of W that break the constraints (wrong sign for their column, or off the mask)."""
    bad = torch.zeros_like(W, dtype=torch.bool)
    if sign is not None:
        bad |= (W * sign.to(W.dtype)) < 0
    if mask is not None:
        bad |= (~mask) & (W != 0)
    return int(bad.sum())


def constrain(W_old: Tensor, W_new: Tensor, sign: Tensor | None, mask: Tensor | None,
              method: str = "project", max_log_step: float = 1.0) -> tuple[Tensor, int]:
    """The next W from the current one and the unconstrained proposal; and the number of entries
    clipped (project) or whose log-step was capped (reparam)."""
    if method not in METHODS:
        raise ValueError(f"unknown constraint method {method!r}; choose one of {list(METHODS)}")
    if sign is None and mask is None:
        return W_new, 0
    if method == "project":
        W = W_new if mask is None else W_new * mask
        if sign is None:
            return W, 0
        s = sign.to(W.dtype)
        wrong = (W * s) < 0
        return torch.where(wrong, torch.zeros_like(W), W), int(wrong.sum())
    support = W_old != 0
    ratio = torch.where(support, (W_new - W_old) / torch.where(support, W_old, torch.ones_like(W_old)),
                        torch.zeros_like(W_old))
    capped = ratio.abs() > max_log_step
    return W_old * torch.exp(ratio.clamp(-max_log_step, max_log_step)), int(capped.sum())
