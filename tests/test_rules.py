"""Batched rules against per-sample formulas with explicit inverses, finite differences and
hand-computed cases (float64)."""
import math

import pytest
import torch

from fprnn.core import reference as ref
from fprnn.core import rules
from fprnn.core.activations import get_activation
from fprnn.core.dynamics import get_dynamics
from fprnn.core.solvers import anderson

D64 = torch.float64


def rel(a, b):
    return float((a - b).norm() / b.norm())


def instance(N, m, zeros=False, sigma=0.6, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = sigma * torch.randn(N, N, generator=g, dtype=D64) / math.sqrt(N)
    r = 0.5 * torch.randn(m, N, generator=g, dtype=D64)
    gain = torch.rand(m, N, generator=g, dtype=D64) * 0.99 + 0.01   # in (0, 1]
    if zeros:
        gain[torch.rand(m, N, generator=g) < 0.3] = 0.0
    D = torch.randn(m, N, generator=g, dtype=D64)
    return W, r, gain, D


SIZES = [(10, 5), (25, 12), (40, 20)]


@pytest.mark.parametrize("N,m", SIZES)
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("name", ["w1", "w3", "w4", "jfb"])
def test_rule_matches_per_sample_formula(name, N, m, zeros):
    W, r, gain, D = instance(N, m, zeros)
    got = rules.RULES[name](W, r, gain, D, 0.3)
    assert rel(got, getattr(ref, name)(W, r, gain, D, 0.3)) < 1e-10


@pytest.mark.parametrize("N,m", SIZES)
def test_w2_matches_eq_2_17(N, m):
    W, r, gain, D = instance(N, m)
    for lr in (0.01, 0.1):
        assert rel(rules.w2(W, r, gain, D, lr), ref.w2(W, r, gain, D, lr)) < 1e-10


def test_w2_with_zero_gains_is_the_limit_of_eq_2_17():
    """eq 2.17 needs G⁻¹; the inverse-free form is its limit as gains → 0."""
    W, r, gain, D = instance(20, 8, zeros=True)
    got = rules.w2(W, r, gain, D, 0.1)
    errs = []
    for eps in (1e-3, 1e-4):
        g_eps = torch.where(gain == 0, torch.full_like(gain, eps), gain)
        errs.append(rel(got, ref.w2(W, r, g_eps, D, 0.1)))
    assert errs[1] < 1e-3 and errs[1] < errs[0] / 5
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("N,m", [(12, 5), (30, 10)])
def test_w2_shared_gain_matches_eq_3_8(N, m):
    W, r, _, D = instance(N, m)
    ones = torch.ones_like(r)
    X = r - r @ W.T                                     # linear model: x = (I − W) r
    for lr in (0.03, 1.0, 3.0):
        got = rules.w2(W, r, ones, D, lr, shared_gain=True)
        assert rel(got, ref.w2_linear_batch(W, X, D, lr)) < 1e-10


def test_w2_tends_to_w3_as_lr_goes_to_zero():
    W, r, gain, D = instance(20, 8)
    d = [rel(rules.w2(W, r, gain, D, lr) / lr, rules.w3(W, r, gain, D, lr) / lr) for lr in (1e-2, 1e-3, 1e-4)]
    assert d[0] > d[1] > d[2] and d[2] < 1e-3 and d[1] / d[2] > 5


def test_w2_domain_error_and_flag():
    W, r, gain, D = instance(10, 4)
    _, B, C = rules.factors(W, r, gain, D)
    A = rules.factors(W, r, gain, D)[0]
    kappa = (C * gain * A).sum(1)
    assert kappa.max() > 0
    lr = 2.0 / float(kappa.max())                       # 1 − η κ_i = −1 for the largest κ
    with pytest.raises(rules.DomainError, match=r"1 − η κ_i ≤ 0"):
        rules.w2(W, r, gain, D, lr)
    dW, info = rules.w2(W, r, gain, D, lr, return_info=True)
    assert info["out_of_domain"] >= 1 and torch.isfinite(dW).all() and float(dW.abs().max()) == 0


def test_w1_equals_finite_differences_of_the_loss_at_the_fixed_point():
    """−ΔW1/η is ∇_W J where J(W) = (1/m) Σ ½‖r_i(W) − y_i‖², r_i solved to 1e-13."""
    N, m = 15, 6
    act, dyn = get_activation("tanh"), get_dynamics("rate")
    g = torch.Generator().manual_seed(1)
    W = 0.7 * torch.randn(N, N, generator=g, dtype=D64) / math.sqrt(N)
    x = torch.randn(m, N, generator=g, dtype=D64)
    y = torch.randn(m, N, generator=g, dtype=D64)

    def solve(W):
        sol = anderson(dyn.state_map(W, x, act), torch.zeros_like(x), tol=1e-14, max_iter=500)
        assert bool(sol.converged.all())
        return sol.u

    def J(W):
        return 0.5 * ((solve(W) - y) ** 2).sum(1).mean()

    r = solve(W)
    gain = act.df(r @ W.T + x)
    dW1 = rules.w1(W, r, gain, r - y, 1.0)
    for s in range(3):
        E = torch.randn(N, N, generator=g, dtype=D64)
        h = 1e-5
        fd = (J(W + h * E) - J(W - h * E)) / (2 * h)
        assert abs(float(fd) - float((-dW1 * E).sum())) < 1e-8 * max(1.0, abs(float(fd)))


def test_w1_adjoint_and_its_failure_report():
    W, r, gain, D = instance(20, 6, sigma=0.5)
    dW, info = rules.w1(W, r, gain, D, 0.2, method="adjoint", tol=1e-14, return_info=True)
    assert info["converged"] and rel(dW, ref.w1(W, r, gain, D, 0.2)) < 1e-10
    Wbig = 3.0 * torch.eye(20, dtype=D64)
    ones = torch.ones_like(r)
    _, info = rules.w1(Wbig, r, ones * 0.9, D, 0.2, method="adjoint", max_iter=50, return_info=True)
    assert info["converged"] is False and info["iters"] <= 50
    with pytest.raises(RuntimeError, match="did not converge"):
        rules.w1(Wbig, r, ones * 0.9, D, 0.2, method="adjoint", max_iter=50)


def test_angle_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert rules.angle(a, torch.tensor([[1.0, 1.0], [0.0, 0.0]])) == pytest.approx(45.0)
    assert rules.angle(a, torch.tensor([[0.0, 0.0], [0.0, 2.0]])) == pytest.approx(90.0)
    assert rules.angle(a, -3 * a) == pytest.approx(180.0)
    assert rules.angle(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, math.sqrt(3)]])) == pytest.approx(60.0)


@pytest.mark.parametrize("name", ["w1", "w2", "w3", "w4"])
def test_rules_reject_bad_input_with_shapes(name):
    W, r, gain, D = instance(6, 3)
    rule = rules.RULES[name]
    with pytest.raises(ValueError, match=r"grad_r must be \(m, N\) = \(m, 6\).*\(3, 5\)"):
        rule(W, r, gain, D[:, :5], 0.1)
    with pytest.raises(ValueError, match="gain has dtype torch.float32 but W has torch.float64"):
        rule(W, r, gain.float(), D, 0.1)
    with pytest.raises(ValueError, match="same number of rows"):
        rule(W, r, gain[:2], D, 0.1)
    with pytest.raises(ValueError, match="lr must be a positive finite number, got -1"):
        rule(W, r, gain, D, -1)
    with pytest.raises(ValueError, match="lr must be a positive finite number, got nan"):
        rule(W, r, gain, D, float("nan"))
    with pytest.raises(ValueError, match=r"W must be a square"):
        rule(W[:, :5], r, gain, D, 0.1)


def test_unknown_rule_lists_choices():
    with pytest.raises(ValueError, match=r"unknown rule 'w9'.*\['jfb', 'w1', 'w2', 'w3', 'w4'\]"):
        rules.get_rule("w9")


def test_no_per_sample_matrices_in_fast_rules():
    """w2, w3, w4 never form an (m, N, N) tensor; w1-exact does (one LU per sample)."""
    W, r, gain, D = instance(64, 32)

    def shapes(fn):
        with torch.autograd.profiler.profile(record_shapes=True) as prof:
            fn(W, r, gain, D, 0.01)
        return {tuple(s) for ev in prof.function_events for s in (ev.input_shapes or []) if s}

    for name in ("w2", "w3", "w4"):
        seen = shapes(rules.RULES[name])
        assert (32, 64) in seen and not any(len(s) == 3 and s[-2:] == (64, 64) for s in seen), name
    exact = lambda *a: rules.w1(*a, method="exact")
    assert any(len(s) == 3 and s[-2:] == (64, 64) for s in shapes(exact))


def test_w1_auto_is_exact_and_hands_only_hard_samples_to_lu():
    """auto = adjoint where it settles, LU for the rest; both parts equal the per-sample formula."""
    W, r, gain, D = instance(30, 12, sigma=0.6)
    gain[:3] = 1.0
    W = W + 0.99 * torch.eye(30, dtype=D64)       # samples with G_i = I: λ(G_i W) near 1.6 → LU
    gain[3:] *= 0.3                                # the rest contract quickly → adjoint
    dW, info = rules.w1(W, r, gain, D, 0.2, return_info=True)
    assert info["exact_samples"] == 3
    assert rel(dW, ref.w1(W, r, gain, D, 0.2)) < 1e-10
    exact = rules.w1(W, r, gain, D, 0.2, method="exact")
    assert rel(dW, exact) < 1e-12
    dW32 = rules.w1(W.float(), r.float(), gain.float(), D.float(), 0.2)
    assert rel(dW32.double(), exact) < 1e-4


def test_jfb_is_w1_without_the_implicit_factor():
    """At W = 0 the factor (I − G W)^{−T} is I, so jfb is the exact gradient; elsewhere it is not."""
    _, r, gain, D = instance(20, 8)
    Z = torch.zeros(20, 20, dtype=D64)
    assert rel(rules.jfb(Z, r, gain, D, 0.3), rules.w1(Z, r, gain, D, 0.3)) < 1e-14
    W = instance(20, 8, sigma=0.8)[0]
    assert rel(rules.jfb(W, r, gain, D, 0.3), rules.w1(W, r, gain, D, 0.3)) > 0.05


@pytest.mark.parametrize("name", ["w1", "w2", "w3", "w4", "jfb"])
def test_sample_step_norms_are_each_samples_own_step(name):
    """‖ΔW_i‖_F of every sample, against the per-sample formula run on that sample alone."""
    g = torch.Generator().manual_seed(11)
    N, m = 9, 7
    W = 0.5 * torch.randn(N, N, generator=g, dtype=torch.float64) / N ** 0.5
    r = torch.tanh(torch.randn(m, N, generator=g, dtype=torch.float64))
    gain = 1 - r ** 2
    delta = torch.randn(m, N, generator=g, dtype=torch.float64)
    got = rules.sample_step_norms(name, W, r, gain, delta, 0.05)
    one = getattr(ref, name)
    want = torch.stack([torch.linalg.norm(one(W, r[i:i + 1], gain[i:i + 1], delta[i:i + 1], 0.05)) for i in range(m)])
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="unknown rule 'bptt'"):
        rules.sample_step_norms("bptt", W, r, gain, delta, 0.05)


def _spread_batch(seed=10, N=6):
    """Three samples at very different scales of rates and gains (seed 10: the one the search below
    found first where the mean of w3's per-sample steps climbs the batch loss)."""
    g = torch.Generator().manual_seed(seed)
    W = 0.8 * torch.randn(N, N, generator=g, dtype=torch.float64) / N ** 0.5
    scale = torch.tensor([[0.1], [1.0], [5.0]], dtype=torch.float64)
    r = torch.rand(3, N, generator=g, dtype=torch.float64) * scale
    gain = torch.rand(3, N, generator=g, dtype=torch.float64) * torch.tensor([[0.2], [1.0], [3.0]], dtype=torch.float64)
    return W, r, gain, torch.randn(3, N, generator=g, dtype=torch.float64)


def test_w3_batch_metric_against_per_sample_factors():
    """ΔW = −η L̄ ∇L R̄ with L̄, R̄ the means of the explicit per-sample factors and ∇L from the
    explicit-inverse w1 of fprnn.core.reference; and each sample's w3 step is −η L_i ∇L_i R_i."""
    W, r, gain, delta = _spread_batch()
    I = torch.eye(len(W), dtype=W.dtype)
    Ls = [(I - W @ torch.diag(gi)) @ (I - W @ torch.diag(gi)).T for gi in gain]
    Rs = [(I - torch.diag(gi) @ W).T @ (I - torch.diag(gi) @ W) for gi in gain]
    grad = -ref.w1(W, r, gain, delta, 1.0)
    want = -0.3 * sum(Ls) / 3 @ grad @ (sum(Rs) / 3)
    assert torch.allclose(rules.w3(W, r, gain, delta, 0.3, metric="batch"), want, rtol=1e-12, atol=1e-15)
    for i in range(3):
        grad_i = -ref.w1(W, r[i:i + 1], gain[i:i + 1], delta[i:i + 1], 1.0)
        assert torch.allclose(ref.w3(W, r[i:i + 1], gain[i:i + 1], delta[i:i + 1], 0.3), -0.3 * Ls[i] @ grad_i @ Rs[i],
                              rtol=1e-12, atol=1e-15)


def test_w3_batch_metric_descends_where_the_mean_of_per_sample_steps_climbs():
    W, r, gain, delta = _spread_batch()
    grad = -rules.w1(W, r, gain, delta, 1.0)
    assert float((rules.w3(W, r, gain, delta, 1.0) * grad).sum()) > 0          # plain w3: uphill
    assert rules.angle(rules.w3(W, r, gain, delta, 1.0), -grad) > 90
    batch = rules.w3(W, r, gain, delta, 1.0, metric="batch")
    assert float((batch * grad).sum()) < 0 and rules.angle(batch, -grad) < 90
    # many random batches: always downhill
    for seed in range(50):
        W, r, gain, delta = _spread_batch(seed)
        grad = -rules.w1(W, r, gain, delta, 1.0)
        assert float((rules.w3(W, r, gain, delta, 1.0, metric="batch") * grad).sum()) < 0, seed


def test_w3_batch_metric_is_w3_when_all_samples_share_their_gains():
    W, r, gain, delta = _spread_batch()
    shared = gain[1:2].expand_as(gain).clone()
    assert torch.allclose(rules.w3(W, r, shared, delta, 0.3, metric="batch"), rules.w3(W, r, shared, delta, 0.3),
                          rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="unknown w3 metric 'kfac'"):
        rules.w3(W, r, gain, delta, 0.3, metric="kfac")
