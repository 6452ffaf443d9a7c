"""The fallback follows the dynamics: it settles what the accelerated solvers leave, at the fixed
point the dynamics reach, and reports what the dynamics do not settle (checked against long
forward-Euler runs of the dynamics, float64)."""
import math

import pytest
import torch

from fprnn.core import solvers
from fprnn.core.activations import get_activation
from fprnn.core.dynamics import get_dynamics
from fprnn.models.dense import FixedPointRNN
from fprnn.training.update import solution_fault

D64 = torch.float64
TANH, RATE = get_activation("tanh"), get_dynamics("rate")


def euler_reference(g, u0, tau=None):
    """The dynamics themselves: forward Euler, dt/τ = 0.02, to a residual of 1e-12."""
    ref = solvers.follow_euler(g, u0, tol=1e-12, dt=0.02, steps=400_000, tau=tau)
    assert bool(ref.converged.all())
    return ref.u


def rotating_network(N=20, m=6, seed=0):
    """W = −1.5 I + rotation: every fixed point stable in continuous time (max Re λ(G W) < 1)
    while |λ(G W)| reaches ≈ 3, so the plain map r ← f(W r + x) expands and cycles."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, N, generator=g, dtype=D64)
    W = -1.5 * torch.eye(N, dtype=D64) + 2.5 * (A - A.T) / math.sqrt(2 * N)
    x = torch.randn(m, N, generator=g, dtype=D64)
    return W, x


def test_the_fallback_settles_where_the_plain_map_cycles_at_the_dynamics_fixed_point():
    W, x = rotating_network()
    net = FixedPointRNN(20, solver="iterate", solver_kwargs={"tol": 1e-10, "max_iter": 300}, dtype="float64")
    net.layer.W.data.copy_(W)
    net.layer.fallback = None
    plain = net.fixed_point(x)
    assert plain.solution.n_nonconverged == len(x)          # the map cycles: no sample settles
    net.layer.fallback = dict(solvers.DEFAULT_FALLBACK)
    assert net.fixed_point(x).solution.n_nonconverged == len(x)   # all left: more than max_share
    net.layer.fallback["max_share"] = 1.0
    fp = net.fixed_point(x)
    sol = fp.solution
    assert bool(sol.converged.all()) and bool(sol.fallback.all()) and (sol.fallback_iters > 0).all()
    assert torch.equal(sol.iters, plain.solution.iters + sol.fallback_iters)
    ref = euler_reference(RATE.state_map(W, x, TANH), torch.zeros_like(x))
    assert float((fp.r - ref).abs().max()) <= 1e-6
    # the reported residual is the true one, and these fixed points are stable but the map expands
    assert torch.allclose(sol.residual, (TANH.f(fp.r @ W.T + x) - fp.r).abs().amax(1), rtol=1e-6, atol=1e-14)
    assert float(sol.residual.max()) <= 1e-10
    assert bool((RATE.stability(W, fp.gain) < 1).all())
    assert bool((get_dynamics("discrete").stability(W, fp.gain) > 1).all())


def test_anderson_failures_are_settled_and_only_those_samples_pay():
    W, x = rotating_network(m=8, seed=1)
    x[:4] *= 8                     # saturated units, small gains: these four are easy
    g, u0 = RATE.state_map(W, x, TANH), torch.zeros_like(x)
    first = solvers.anderson(g, u0, tol=1e-10)     # default budget: the other four defeat it
    assert first.converged.tolist() == [True] * 4 + [False] * 4
    out = solvers.settle(g, u0, first, jac=RATE.state_jacobian(W, x, TANH))
    assert torch.equal(out.fallback, ~first.converged)
    assert torch.equal(out.u[first.converged], first.u[first.converged])     # untouched
    assert bool(out.converged.all()) and out.stats()["fallback"] == first.n_nonconverged
    ref = euler_reference(g, u0)
    assert float((out.u - ref).abs().max()) <= 1e-6


@pytest.mark.parametrize("dyn,act", [("rate", "tanh"), ("voltage", "tanh"),
                                     ("rate", {"name": "powerlaw", "k": 0.3, "n": 2, "r_max": 5})])
def test_the_dynamics_jacobians_equal_autograd(dyn, act):
    W, x = rotating_network(N=7, m=3)
    d, a = get_dynamics(dyn), get_activation(act)
    u = 0.3 * torch.randn(3, 7, dtype=D64)
    rows = torch.tensor([2, 0, 1])
    g = d.state_map(W, x, a)
    assert torch.allclose(d.state_jacobian(W, x, a)(u, rows), solvers.jacobian(g, u, rows), rtol=1e-12, atol=1e-14)


def test_time_constants_decide_which_attractor_the_dynamics_reach():
    """Two units that inhibit each other: unit 1 gets the larger input and wins when both are
    equally fast — but with τ = (1, 8) unit 0 rises first and wins. The fallback follows the
    dynamics with their time constants (and a solver that ignores them picks the other)."""
    W = torch.tensor([[0.0, -3.0], [-3.0, 0.0]], dtype=D64)
    x = torch.tensor([[1.0, 1.2]], dtype=D64)
    tau = torch.tensor([1.0, 8.0], dtype=D64)
    g, u0 = RATE.state_map(W, x, TANH), torch.zeros_like(x)
    jac = RATE.state_jacobian(W, x, TANH)
    fast = solvers.ptc(g, u0, tol=1e-12, jac=jac)
    slow = solvers.ptc(g, u0, tol=1e-12, jac=jac, tau=tau)
    assert float((fast.u - euler_reference(g, u0)).abs().max()) <= 1e-6
    assert float((slow.u - euler_reference(g, u0, tau)).abs().max()) <= 1e-6
    assert fast.u[0, 1] > 0 > fast.u[0, 0] and slow.u[0, 0] > 0 > slow.u[0, 1]   # two attractors


def test_rk23_follows_the_trajectory_to_the_attractor_the_dynamics_reach():
    """Matrix-free and explicit, yet under error control: with and without time constants it
    ends where the dynamics end (two attractors, decided by the trajectory), and where the plain
    map cycles it settles at the dynamics' fixed point."""
    W = torch.tensor([[0.0, -3.0], [-3.0, 0.0]], dtype=D64)
    x = torch.tensor([[1.0, 1.2]], dtype=D64)
    tau = torch.tensor([1.0, 8.0], dtype=D64)
    g, u0 = RATE.state_map(W, x, TANH), torch.zeros_like(x)
    fast = solvers.follow_rk23(g, u0, tol=1e-12)
    slow = solvers.follow_rk23(g, u0, tol=1e-12, tau=tau)
    assert bool(fast.converged.all() and slow.converged.all())
    assert float((fast.u - euler_reference(g, u0)).abs().max()) <= 1e-6
    assert float((slow.u - euler_reference(g, u0, tau)).abs().max()) <= 1e-6
    assert fast.u[0, 1] > 0 > fast.u[0, 0] and slow.u[0, 0] > 0 > slow.u[0, 1]
    W, x = rotating_network()
    g, u0 = RATE.state_map(W, x, TANH), torch.zeros_like(x)
    sol = solvers.follow_rk23(g, u0, tol=1e-10)
    assert bool(sol.converged.all()) and sol.solver == "rk23"
    assert float((sol.u - euler_reference(g, u0)).abs().max()) <= 1e-6
    assert torch.allclose(sol.residual, (g(sol.u) - sol.u).abs().amax(1), rtol=1e-6, atol=1e-14)
    assert (sol.iters - 1) .remainder(3).eq(0).all()          # evaluations: 1, then 3 a try


def test_rk23_controls_its_step_where_fixed_steps_blow_up():
    """du/dt = −a (u − c) per sample: fixed Euler steps of 0.5 are unstable for a = 50 (|1 − 25| > 1)
    and the state blows up; the error-controlled steps shrink to the stable range and settle at c,
    spending more evaluations where the decay is stiffer."""
    a = torch.tensor([[1.0], [50.0]], dtype=D64)
    c = torch.tensor([[0.3], [-0.7]], dtype=D64)

    def g(u, rows=None):
        aa, cc = (a, c) if rows is None else (a[rows], c[rows])
        return u - aa * (u - cc)
    u0 = torch.zeros(2, 1, dtype=D64)
    fixed = solvers.follow_euler(g, u0, tol=1e-10, dt=0.5, steps=2000)
    assert fixed.status.tolist() == [solvers.SUCCESSFUL, solvers.NONFINITE]
    sol = solvers.follow_rk23(g, u0, tol=1e-10)
    assert bool(sol.converged.all()) and torch.allclose(sol.u, c, atol=1e-9)
    assert int(sol.iters[1]) > int(sol.iters[0])
    with pytest.raises(ValueError, match="accuracy must be a positive finite number, got 0"):
        solvers.follow_rk23(g, u0, accuracy=0)


def test_the_multistable_check_finds_a_two_attractor_input():
    """Mutual inhibition with the larger input on unit 1: two attractors (either unit wins) and a
    saddle between them. Anderson, a secant method, converges to the saddle, which the dynamics
    never reach; the check says so. With τ = (1, 8) the dynamics reach the other attractor."""
    W = torch.tensor([[0.0, -3.0], [-3.0, 0.0]], dtype=D64)
    net = FixedPointRNN(2, solver="anderson", solver_kwargs={"tol": 1e-12}, dtype="float64")
    net.layer.W.data.copy_(W)
    x = torch.tensor([[1.0, 1.2], [1.0, -1.0]], dtype=D64)   # the second input has one attractor
    mine, reached = net.layer.solved_fixed_point(x), net.layer.reached_fixed_point(x)
    assert bool(mine.solution.converged.all()) and bool(reached.solution.converged.all())
    assert net.layer.stability(mine).tolist()[0] > 1 > net.layer.stability(reached).max()
    g = RATE.state_map(W, x, TANH)
    assert float((reached.r - euler_reference(g, torch.zeros_like(x))).abs().max()) <= 1e-6
    assert net.multistable(x).tolist() == [True, False]
    net.layer.tau = torch.tensor([1.0, 8.0], dtype=D64)
    reached = net.layer.reached_fixed_point(x)
    assert float((reached.r - euler_reference(g, torch.zeros_like(x), net.layer.tau)).abs().max()) <= 1e-6
    assert reached.r[0, 0] > 0 > reached.r[0, 1] and net.multistable(x).tolist() == [True, False]


def test_a_limit_cycle_is_reported_unconverged_with_its_reason():
    """W = 2 [[1, −2], [2, 1]]: the only fixed point is an unstable focus (λ(G W) ≈ 2 ± 4i) and
    the dynamics circle on a limit cycle. Newton lands on the focus: reported unstable; Euler
    runs out of steps. Neither is hidden, and the step's fault names the reason."""
    W = 2.0 * torch.tensor([[1.0, -2.0], [2.0, 1.0]], dtype=D64)
    x = torch.tensor([[0.1, 0.0], [0.0, 0.05]], dtype=D64)
    g, u0 = RATE.state_map(W, x, TANH), torch.zeros_like(x)
    assert solvers.follow_euler(g, u0, tol=1e-8, steps=20_000).n_nonconverged == 2     # it never settles
    first = solvers.iterate(g, u0, tol=1e-8)
    for method, code in (("ptc", solvers.UNSTABLE), ("euler", solvers.MAX_STEPS), ("rk23", solvers.MAX_STEPS)):
        out = solvers.settle(g, u0, first, method=method, jac=RATE.state_jacobian(W, x, TANH))
        assert out.n_nonconverged == 2 and (out.status == code).all(), method
        assert solvers.STATUS_NAMES[code] in out.failures()
    net = FixedPointRNN(2, solver="iterate", solver_kwargs={"tol": 1e-8}, dtype="float64",
                        fallback={**solvers.DEFAULT_FALLBACK, "max_share": 1.0})
    net.layer.W.data.copy_(W)
    fault = solution_fault(net.fixed_points(x), max_nonconverged=0.0)
    assert "2/2 samples: 2 unstable fixed point" in fault


def test_discrete_networks_get_no_fallback():
    W, x = rotating_network()
    net = FixedPointRNN(20, dynamics="discrete", solver="iterate", solver_kwargs={"tol": 1e-10}, dtype="float64")
    net.layer.W.data.copy_(W)
    sol = net.fixed_point(x).solution
    assert sol.n_nonconverged == len(x) and not sol.fallback.any()
    with pytest.raises(ValueError, match="discrete"):
        net.layer.reached_fixed_point(x)


def test_fallback_options_are_checked():
    with pytest.raises(ValueError, match=r"fallback must be null or \{method: one of \['euler', 'ptc', 'rk23'\]"):
        FixedPointRNN(5, fallback={"method": "newton"})
    with pytest.raises(ValueError, match=r"fallback 'ptc' has no option\(s\) \['steps'\]"):
        FixedPointRNN(5, fallback={"method": "ptc", "steps": 3})
    with pytest.raises(ValueError, match="max_iter must be a positive integer, got 0"):
        FixedPointRNN(5, fallback={"method": "ptc", "max_iter": 0})
    with pytest.raises(ValueError, match=r"fallback max_share must be a fraction in \(0, 1\], got 2"):
        FixedPointRNN(5, fallback={"method": "ptc", "max_share": 2})
    net = FixedPointRNN(5, fallback=None)
    assert net.layer.fallback is None and net.config["fallback"] is None
    assert FixedPointRNN(5).config["fallback"] == solvers.DEFAULT_FALLBACK
