"""The stability certificate (fprnn.core.stability) and the start check built on it
(TrialRNN.start_stability): the bound is never below the exact value, and the decision it gives,
tier by tier, is the one exact eigenvalues give on every start — planted unstable starts included."""
import pytest
import torch

from fprnn.core.dynamics import DYNAMICS
from fprnn.core.stability import stability_bound
from fprnn.models.ctrnn import TrialRNN


@pytest.mark.parametrize("dynamics", ["rate", "voltage"])
@pytest.mark.parametrize("sigma", [0.3, 0.8, 1.5])
def test_the_bound_is_never_below_the_exact_stability_value(dynamics, sigma):
    g = torch.Generator().manual_seed(int(10 * sigma))
    N, m = 24, 40
    W = sigma * torch.randn(N, N, generator=g, dtype=torch.float64) / N ** 0.5
    W += 0.5 * sigma * torch.triu(torch.randn(N, N, generator=g, dtype=torch.float64), 1) / N ** 0.5  # far from normal
    gain = torch.rand(m, N, generator=g, dtype=torch.float64)
    gain[: m // 4] = gain[: m // 4] * (gain[: m // 4] > 0.5)        # some units with gain exactly 0 (relu)
    dyn = DYNAMICS[dynamics]
    for tau in (None, torch.cat([torch.full((N // 2,), 20.0), torch.full((N - N // 2,), 10.0)]).double()):
        exact = dyn.stability(W, gain, tau)
        bound = stability_bound(W, gain, tau)
        assert bool((bound >= exact - 1e-12).all()), float((exact - bound).max())
    # W symmetric and every gain 1: the bound's first level is λ_max(W), the exact value
    S = (W + W.T) / 2
    ones = torch.ones(3, N, dtype=torch.float64)
    assert torch.allclose(stability_bound(S, ones), torch.linalg.eigvalsh(S).max().expand(3), atol=1e-12)


def test_a_negative_gain_leaves_the_start_to_its_eigenvalues():
    W = torch.eye(3, dtype=torch.float64) * 0.1
    gain = torch.tensor([[0.5, 0.5, 0.5], [0.5, -0.1, 0.5]], dtype=torch.float64)
    b = stability_bound(W, gain)
    assert b[0] < 1 and torch.isinf(b[1])
    with pytest.raises(ValueError, match=r"W must be \(N, N\) and gain \(m, N\)"):
        stability_bound(W, gain[:, :2])


def _mixed_batch(stability: str, seed: int = 0):
    """A network whose starts are of every kind: max Re λ(W) > 1, so a start where every unit has
    gain ≈ 1 (static input 0, b = 0: r = 0) is unstable — planted in rows 0–3 —, while large inputs
    saturate the units (certified stable) and middling ones fall between (the exact tier)."""
    N, B, T, K = 32, 48, 5, 3
    g = torch.Generator().manual_seed(seed)
    m = TrialRNN(N, 2, 2, dtype="float64", seed=seed, stability=stability)
    with torch.no_grad():
        m.layer.W.copy_(1.6 * torch.randn(N, N, generator=g, dtype=torch.float64) / N ** 0.5)
        m.layer.V.copy_(torch.randn(N, 2, generator=g, dtype=torch.float64))
    amp = torch.linspace(0, 6, B, dtype=torch.float64)[torch.randperm(B, generator=g)]
    amp[:4] = 0                                                 # the planted unstable starts
    s = torch.randn(B, 2, generator=g, dtype=torch.float64) * amp.unsqueeze(1)   # every trial its own input
    ob = s.unsqueeze(1).expand(B, T, 2).clone()
    ob[:, K:] = torch.randn(B, T - K, 2, generator=g, dtype=torch.float64)
    with torch.no_grad():
        m(ob, torch.full((B,), K))
    return m


@pytest.mark.parametrize("stability", ["auto", "exact"])
def test_every_start_gets_the_decision_of_its_exact_eigenvalues(stability):
    m = _mixed_batch(stability)
    rep = m.report
    fp = rep.fixed_point
    exact = torch.linalg.eigvals(fp.gain.unsqueeze(-1) * m.layer.W.detach()).real.amax(-1)
    checked = ~torch.isnan(rep.stability)                     # every converged start: the solver's share
    assert int(checked.sum()) + rep.from_rest == len(exact) and rep.from_rest < len(exact) // 4
    assert torch.equal(rep.at_fixed_point, checked & (exact < 1))   # the decision, start by start
    assert bool(checked[:4].all() & (exact[:4] > 1).all()) and not rep.at_fixed_point[:4].any()  # planted: caught
    assert rep.unstable == int((checked & (exact >= 1)).sum()) > 4
    s, e = rep.stability[checked], exact[checked]
    assert bool((s >= e - 1e-10).all())                       # a certified value bounds the exact one
    if stability == "auto":
        assert 0 < rep.certified < len(e)                     # both tiers were used
        assert torch.allclose(s[s >= 1], e[s >= 1], atol=1e-10)
    else:
        assert rep.certified == 0 and torch.allclose(s, e, atol=1e-10)
