"""Activation functions f and their derivatives f' (the gains G = diag f'(z), eq 2.3)."""
from __future__ import annotations

import math
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


def powerlaw(k: float = 0.04, n: float = 2.0, r_max: float | None = None, cap: str = "smooth") -> Activation:
    """The supralinear unit of the stabilized supralinear network, f(z) = k [z]₊ⁿ (n ≥ 1), with a
    rate bound r_max so that rates cannot run away: ``cap="smooth"`` f = r_max tanh(k[z]₊ⁿ / r_max)
    (f' never 0 above threshold), ``"hard"`` f = min(k[z]₊ⁿ, r_max). f' exact."""
    for name, v, lo in (("k", k, 0.0), ("n", n, 1.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or v == 0:
            raise ValueError(f"powerlaw {name} must be a finite number ≥ {lo:g} (and > 0), got {v!r}")
    if r_max is not None and (isinstance(r_max, bool) or not isinstance(r_max, (int, float)) or not r_max > 0):
        raise ValueError(f"powerlaw r_max must be a positive number or null, got {r_max!r}")
    if cap not in ("smooth", "hard"):
        raise ValueError(f"powerlaw cap must be 'smooth' or 'hard', got {cap!r}")

    def raw(z):
        return k * torch.relu(z) ** n

    def draw(z):
        return k * n * torch.relu(z) ** (n - 1) * (z > 0).to(z.dtype)

    if r_max is None:
        f, df = raw, draw
    elif cap == "smooth":
        def f(z):
            return r_max * torch.tanh(raw(z) / r_max)

        def df(z):
            return draw(z) * (1 - torch.tanh(raw(z) / r_max) ** 2)
    else:
        def f(z):
            return torch.clamp(raw(z), max=r_max)

        def df(z):
            return draw(z) * (raw(z) < r_max).to(z.dtype)
    label = f"powerlaw(k={k:g}, n={n:g}" + (f", r_max={r_max:g} {cap}" if r_max is not None else "") + ")"
    return Activation(label, f, df)


#: activations with parameters: ``{"name": "powerlaw", "k": 0.04, "n": 2}`` in a config
FACTORIES: dict[str, Callable[..., Activation]] = {"powerlaw": powerlaw}


def get_activation(spec) -> Activation:
    """Look up an activation by name (``"tanh"``, ``"powerlaw"`` with its defaults), build one
    with parameters from a dict (``{"name": "powerlaw", "k": 0.04, "n": 2, "r_max": 200}``), pass
    an [`Activation`][fprnn.core.activations.Activation] through, or wrap a callable (its derivative then comes from autograd)."""
    if isinstance(spec, Activation):
        return spec
    if isinstance(spec, dict):
        kw = dict(spec)
        name = kw.pop("name", None)
        if name not in FACTORIES:
            raise ValueError(f"an activation with parameters needs name: one of {sorted(FACTORIES)}, got {name!r}")
        try:
            return FACTORIES[name](**kw)
        except TypeError as e:
            raise ValueError(f"activation {name!r}: {e}") from None
    if isinstance(spec, str) and spec in FACTORIES:
        return FACTORIES[spec]()
    if isinstance(spec, str):
        try:
            return ACTIVATIONS[spec]
        except KeyError:
            raise ValueError(
                f"unknown activation {spec!r}; choose one of {sorted([*ACTIVATIONS, *FACTORIES])} or pass a callable"
            ) from None
    if callable(spec):
        return Activation(getattr(spec, "__name__", "custom"), spec, _autograd_df(spec))
    raise ValueError(f"activation must be a name {sorted(ACTIVATIONS)} or a callable, got {spec!r}")
