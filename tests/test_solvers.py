"""Solvers agree on the fixed point, report honest stats, and handle the hard cases."""
import math

import pytest
import torch

from fprnn.core import solvers
from fprnn.core.activations import ACTIVATIONS, get_activation
from fprnn.core.dynamics import get_dynamics
from fprnn.models.dense import FixedPointRNN

D64 = torch.float64
TANH, RATE = get_activation("tanh"), get_dynamics("rate")


def net(N=30, m=12, sigma=0.8, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = sigma * torch.randn(N, N, generator=g, dtype=D64) / math.sqrt(N)
    x = torch.randn(m, N, generator=g, dtype=D64)
    return W, x


def true_residual(W, x, r, act=TANH):
    return (act.f(r @ W.T + x) - r).abs().amax(1)


def reference_fixed_point(W, x, act=TANH):
    sol = solvers.anderson(RATE.state_map(W, x, act), torch.zeros_like(x), tol=1e-14,
                           max_iter=2000, mix_above=0)
    assert bool(sol.converged.all())
    return sol.u


@pytest.mark.parametrize("solve", [
    lambda g, u0: solvers.anderson(g, u0, tol=1e-10),
    lambda g, u0: solvers.anderson(g, u0, tol=1e-10, mix_above=0, memory=3, damping=0.7),
    lambda g, u0: solvers.iterate(g, u0, tol=1e-10),
    lambda g, u0: solvers.iterate(g, u0, tol=1e-10, damping=0.5, max_iter=2000),
    lambda g, u0: solvers.euler(g, u0, dt=0.2, steps=5000, tol=1e-10),
], ids=["anderson", "anderson-classic", "iterate", "iterate-damped", "euler"])
def test_every_solver_reaches_the_same_fixed_point_with_honest_stats(solve):
    W, x = net()
    r_star = reference_fixed_point(W, x)
    sol = solve(RATE.state_map(W, x, TANH), torch.zeros_like(x))
    assert bool(sol.converged.all())
    res = true_residual(W, x, sol.u)
    assert torch.allclose(sol.residual, res, rtol=1e-6, atol=1e-15)   # the reported residual is real
    assert float(sol.residual.max()) <= 1e-10 and sol.max_residual == pytest.approx(float(res.max()), rel=1e-6)
    # a contraction with factor ρ < 1 is within residual/(1 − ρ) of the fixed point
    assert float((sol.u - r_star).abs().max()) < 1e-8
    assert (sol.iters >= 1).all() and sol.iters_mean > 1


def test_direct_solver_for_the_linear_model():
    W, x = net(sigma=0.5)
    sol = solvers.direct(W, x)
    r = torch.linalg.solve(torch.eye(30, dtype=D64) - W, x.T).T
    assert torch.allclose(sol.u, r, atol=1e-13) and sol.max_residual < 1e-13


def test_oscillating_map_minus_2I():
    """W = −2I with tanh: max Re λ(GW) < 1 (stable in continuous time) but |λ| up to 2, so plain
    iteration oscillates. The default solver still converges; plain iteration reports failure."""
    N = 8
    W = -2.0 * torch.eye(N, dtype=D64)
    x = torch.linspace(-1.5, 1.5, 6, dtype=D64).unsqueeze(1).repeat(1, N)
    g = RATE.state_map(W, x, TANH)
    sol = solvers.anderson(g, torch.zeros_like(x), tol=1e-10)
    assert bool(sol.converged.all()) and float(true_residual(W, x, sol.u).max()) <= 1e-10
    gain = TANH.df(sol.u @ W.T + x)
    assert (RATE.stability(W, gain) < 1).all()
    assert (get_dynamics("discrete").stability(W, gain) > 1).any()
    plain = solvers.iterate(g, torch.zeros_like(x), tol=1e-10, max_iter=300)
    assert plain.n_nonconverged > 0 and not bool(plain.converged.all())
    assert float(plain.residual.max()) > 1e-3


def test_paper_euler_protocol_reports_its_residual():
    W, x = net(N=50, m=8, sigma=0.5)
    sol = solvers.euler(RATE.state_map(W, x, TANH), torch.zeros_like(x), dt=0.01, steps=500)
    assert (sol.iters == 500).all() and sol.n_nonconverged == 8
    res = true_residual(W, x, sol.u)
    assert torch.allclose(sol.residual, res) and float(res.min()) > 1e-3


def test_per_sample_stopping_and_warm_start():
    W, x = net(m=10)
    x[:5] *= 5                         # saturated units (small gains) converge in fewer steps
    g = RATE.state_map(W, x, TANH)
    calls = []
    def counting(u, rows=None):
        calls.append(u.shape[0])
        return g(u, rows)
    sol = solvers.anderson(counting, torch.zeros_like(x), tol=1e-12)
    assert bool(sol.converged.all())
    assert sol.iters[:5].float().mean() < sol.iters[5:].float().mean()
    assert min(calls) < 10             # finished samples stopped costing compute
    warm = solvers.anderson(g, sol.u, tol=1e-12)
    assert (warm.iters == 1).all() and bool(warm.converged.all())


def test_nonconvergence_is_reported_not_hidden():
    W, x = net(sigma=4.0)
    sol = solvers.anderson(RATE.state_map(W, x, TANH), torch.zeros_like(x), tol=1e-12, max_iter=20)
    assert sol.n_nonconverged > 0
    assert torch.equal(sol.converged, sol.residual <= 1e-12)
    # the reported residual is the true residual of the returned state, for every sample
    assert torch.allclose(sol.residual, true_residual(W, x, sol.u), rtol=1e-12, atol=0)


def test_voltage_and_discrete_dynamics_share_the_fixed_point():
    W, x = net(sigma=0.5)
    r_star = reference_fixed_point(W, x)
    for dyn in ("voltage", "discrete"):
        m = FixedPointRNN(30, dynamics=dyn, solver="anderson", solver_kwargs={"tol": 1e-12}, dtype="float64")
        fp = m.fixed_point(x, W=W)
        assert float((fp.r - r_star).abs().max()) < 1e-9, dyn


def test_stability_criteria_match_explicit_eigenvalues():
    W, x = net(N=12, m=4, sigma=1.3)
    gain = torch.rand(4, 12, dtype=D64)
    cont = get_dynamics("rate").stability(W, gain)
    disc = get_dynamics("discrete").stability(W, gain)
    for i in range(4):
        lam = torch.linalg.eigvals(torch.diag(gain[i]) @ W)
        assert float(cont[i]) == pytest.approx(float(lam.real.max()))
        assert float(disc[i]) == pytest.approx(float(lam.abs().max()))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_activation_derivatives_match_autograd(name):
    act = get_activation(name)
    z = torch.linspace(-3, 3, 101, dtype=D64).requires_grad_(True)
    (d,) = torch.autograd.grad(act.f(z).sum(), z)
    assert torch.allclose(act.df(z.detach()), d)


def test_custom_activation_gets_autograd_derivative():
    act = get_activation(lambda z: torch.sin(z) + z ** 3)
    z = torch.linspace(-2, 2, 9, dtype=D64)
    assert torch.allclose(act.df(z), torch.cos(z) + 3 * z ** 2)


def test_bad_names_and_options_are_rejected_with_choices():
    with pytest.raises(ValueError, match=r"unknown activation 'sigmoidd'.*\['identity', 'powerlaw', 'relu', 'softplus', 'tanh'\]"):
        get_activation("sigmoidd")
    with pytest.raises(ValueError, match=r"unknown dynamics 'ratee'.*\['discrete', 'rate', 'voltage'\]"):
        get_dynamics("ratee")
    with pytest.raises(ValueError, match=r"unknown solver 'newton'.*\['anderson', 'direct', 'euler', 'iterate'\]"):
        FixedPointRNN(5, solver="newton")
    with pytest.raises(ValueError, match=r"solver 'euler' has no option\(s\) \['memory'\]"):
        FixedPointRNN(5, solver="euler", solver_kwargs={"memory": 3})
    W, x = net(N=4, m=2)
    g = RATE.state_map(W, x, TANH)
    with pytest.raises(ValueError, match="tol must be a positive finite number, got 0"):
        solvers.anderson(g, torch.zeros_like(x), tol=0)
    with pytest.raises(ValueError, match=r"damping must be in \(0, 1\], got 1.5"):
        solvers.iterate(g, torch.zeros_like(x), damping=1.5)
    with pytest.raises(ValueError, match="steps must be a positive integer, got 2.5"):
        solvers.euler(g, torch.zeros_like(x), steps=2.5)
