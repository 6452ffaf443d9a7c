"""Network dynamics that share the fixed points r = f(W r + x) (eq 2.2).

Each dynamics is written as a fixed-point map on its own state u, u∗ = g(u∗), so that one
forward-Euler step with step size dt/τ is u ← u + (dt/τ)(g(u) − u):

- ``rate``     τ dr/dt = −r + f(W r + x)          (eq 2.1), state r, g(r) = f(W r + x)
- ``voltage``  τ dv/dt = −v + W f(v) + x, r = f(v), state v, g(v) = W f(v) + x
- ``discrete`` r(n+1) = f(W r(n) + x)             (eq 2.4), state r; a "step" is the map itself

Batches are row-major: u, x are (m, N), rows = samples, so W r is ``r @ W.T``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fprnn.core.activations import Activation

Tensor = torch.Tensor
#: g(u, rows): the map on the states of the samples ``rows`` (None: all of them).
StateMap = Callable[[Tensor, "Tensor | None"], Tensor]


def row_gatherer(x: Tensor) -> Callable[["Tensor | None"], Tensor]:
    """rows ↦ x[rows] (x itself for None), gathered once per working set: a solver passes the same
    ``rows`` tensor for many evaluations, and re-indexing the inputs at each one copies them."""
    last: dict = {"rows": None, "x": x}

    def rows_of(rows: Tensor | None) -> Tensor:
        if rows is None:
            return x
        if last["rows"] is not rows:
            last["rows"], last["x"] = rows, x[rows]
        return last["x"]
    return rows_of


@dataclass(frozen=True)
class Dynamics:
    name: str
    continuous: bool
    state_is_voltage: bool = False

    def state_map(self, W: Tensor, x: Tensor, act: Activation) -> StateMap:
        """The map g whose fixed point is this dynamics' equilibrium, restricted to ``rows``."""
        rows_of = row_gatherer(x)
        if self.state_is_voltage:
            def g(v: Tensor, rows: Tensor | None = None) -> Tensor:
                return act.f(v) @ W.T + rows_of(rows)
        else:
            def g(r: Tensor, rows: Tensor | None = None) -> Tensor:
                return act.f(r @ W.T + rows_of(rows))
        return g

    def state_jacobian(self, W: Tensor, x: Tensor, act: Activation) -> Callable[[Tensor, "Tensor | None"], Tensor]:
        """u, rows ↦ the per-sample Jacobians ∂g/∂u (a, N, N) of `state_map` at the states u
        of the samples ``rows``: G W with G = diag f'(W r + x) for rate and discrete dynamics, W G
        with G = diag f'(v) for voltage dynamics — the matrices of eq 2.3."""
        rows_of = row_gatherer(x)

        def jac(u: Tensor, rows: Tensor | None = None) -> Tensor:
            if self.state_is_voltage:
                return self._gain_times(W, act.df(u))
            return self._gain_times(W, act.df(u @ W.T + rows_of(rows)))
        return jac

    def _gain_times(self, W: Tensor, gain: Tensor) -> Tensor:
        """G_i W (rate, discrete: row j of W scaled by g_ij) or W G_i (voltage: column j), (m, N, N)."""
        return W * gain.unsqueeze(-2) if self.state_is_voltage else gain.unsqueeze(-1) * W

    def rate(self, u: Tensor, act: Activation) -> Tensor:
        """Firing rates r from the state u."""
        return act.f(u) if self.state_is_voltage else u

    def euler_dt(self, dt: float) -> float:
        """Step size of one simulated step: dt/τ for continuous time, 1 for the discrete map."""
        return dt if self.continuous else 1.0

    def stability(self, W: Tensor, gain: Tensor, tau: Tensor | None = None) -> Tensor:
        """Per-sample stability value s_i of the fixed point with gains ``gain`` (m, N);
        stable iff s_i < 1. Continuous time (J = (−I + G W)/τ, eq 2.3): s_i = max Re λ(G_i W).
        Discrete time (eq 2.4): s_i = ρ(G_i W).

        With per-unit time constants ``tau`` (N,) the linearization is J_i = T⁻¹(−I + G_i W) for
        rate dynamics and T⁻¹(−I + W G_i) for voltage dynamics (T = diag τ): their eigenvalues
        differ once τ does. Then s_i = 1 + τ_min max Re λ(J_i), which is max Re λ(G_i W) again
        when all τ are equal."""
        if tau is None:     # λ(W G_i) = λ(G_i W): the rate form serves every dynamics
            lam = torch.linalg.eigvals(gain.unsqueeze(-1) * W)
            return lam.real.amax(-1) if self.continuous else lam.abs().amax(-1)
        if not self.continuous:
            raise ValueError("time constants apply to continuous dynamics only")
        M = self._gain_times(W, gain)
        eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)
        J = (M - eye) / tau.to(W.dtype).unsqueeze(-1)
        return 1 + tau.min() * torch.linalg.eigvals(J).real.amax(-1)


@torch.no_grad()
def power_radius(apply: Callable[[Tensor], Tensor], like: Tensor, iters: int = 30, seed: int = 0) -> Tensor:
    """ρ(M_i) per sample (m,) of a batch of linear maps ``apply`` (rows (m, N) → (m, N)) by power
    iteration from a random start (shape and dtype of ``like``): the growth of ‖M_i^k v‖ over the
    last half of ``iters`` steps, (‖v_k‖/‖v_{k/2}‖)^{2/k}. It converges like (|λ₂|/|λ₁|)^k and
    underestimates ρ when it has not; a complex dominant pair makes single-step ratios oscillate,
    which the averaged growth does not. An estimate, not a certificate."""
    return power_iteration(apply, like, iters, seed)[1]


def power_direction(apply: Callable[[Tensor], Tensor], like: Tensor, iters: int = 30, seed: int = 0) -> Tensor:
    """Unit rows v (m, N) after ``iters`` steps of the power iteration of
    [`power_radius`][fprnn.core.dynamics.power_radius]: about the dominant direction of each M_i, so that
    ‖M_i v‖ — one more application, which autograd can differentiate — estimates ρ(M_i)."""
    return power_iteration(apply, like, iters, seed)[0]


def power_iteration(apply: Callable[[Tensor], Tensor], like: Tensor, iters: int, seed: int) -> tuple[Tensor, Tensor]:
    """The last unit rows and the averaged growth over the last half of ``iters`` power steps."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    v = torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device)
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    log_growth = torch.zeros(len(like), dtype=like.dtype, device=like.device)
    half = iters // 2
    for k in range(iters):
        v = apply(v)
        norm = torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        if k >= half:
            log_growth += norm.squeeze(1).log()
        v = v / norm
    return v, (log_growth / (iters - half)).exp()


DYNAMICS: dict[str, Dynamics] = {
    "rate": Dynamics("rate", continuous=True),
    "voltage": Dynamics("voltage", continuous=True, state_is_voltage=True),
    "discrete": Dynamics("discrete", continuous=False),
}


def get_dynamics(spec: str | Dynamics) -> Dynamics:
    if isinstance(spec, Dynamics):
        return spec
    try:
        return DYNAMICS[spec]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dynamics {spec!r}; choose one of {sorted(DYNAMICS)}") from None


def eig_W(W: Tensor) -> tuple[float, float]:
    """(max Re λ(W), ρ(W)): the authors' proxy for stability, computed on W alone."""
    lam = torch.linalg.eigvals(W.detach())
    return float(lam.real.max()), float(lam.abs().max())
