"""Activation functions f and their derivatives f' (the gains G = diag f'(z), eq 2.3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Activation:
    """An elementwise f with its derivative f'. ``df`` takes the pre-activation z, not r,
    so that gains are right away from an exact fixed point too."""

    name: str
    f: Callable[[Tensor], Tensor]
    df: Callable[[Tensor], Tensor]
    is_identity: bool = False

    def __call__(self, z: Tensor) -> Tensor:
        return self.f(z)


def _autograd_df(f: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """f'(z) of an elementwise f by autograd (the fallback for a user's callable)."""

    def df(z: Tensor) -> Tensor:
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(f(zz).sum(), zz)
        return g

    return df


ACTIVATIONS: dict[str, Activation] = {
    "tanh": Activation("tanh", torch.tanh, lambda z: 1.0 - torch.tanh(z) ** 2),
    "relu": Activation("relu", torch.relu, lambda z: (z > 0).to(z.dtype)),
    "identity": Activation("identity", lambda z: z, torch.ones_like, is_identity=True),
    "softplus": Activation("softplus", F.softplus, torch.sigmoid),
}


def get_activation(spec: str | Activation | Callable[[Tensor], Tensor]) -> Activation:
    """Look up an activation by name, pass an :class:`Activation` through, or wrap a callable
    (its derivative then comes from autograd)."""
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, str):
        try:
            return ACTIVATIONS[spec]
        except KeyError:
            raise ValueError(
                f"unknown activation {spec!r}; choose one of {sorted(ACTIVATIONS)} or pass a callable"
            ) from None
    if callable(spec):
        return Activation(getattr(spec, "__name__", "custom"), spec, _autograd_df(spec))
    raise ValueError(f"activation must be a name {sorted(ACTIVATIONS)} or a callable, got {spec!r}")
