import math

import pytest
import torch

from fprnn.core import rules
from fprnn.models.dense import FixedPointRNN


def test_init_scales_and_seed_reproducibility():
    a = FixedPointRNN(300, 784, 10, sigma_W=0.5, seed=3)
    b = FixedPointRNN(300, 784, 10, sigma_W=0.5, seed=3)
    c = FixedPointRNN(300, 784, 10, sigma_W=0.5, seed=4)
    assert torch.equal(a.W, b.W) and torch.equal(a.W_in, b.W_in) and not torch.equal(a.W, c.W)
    # σ_W Z/√N: entries have std σ_W/√N; W_in: 1/√n_in; W_out: 1/√N
    assert float(a.W.detach().std() * math.sqrt(300)) == pytest.approx(0.5, rel=0.02)
    assert float(a.W_in.std() * math.sqrt(784)) == pytest.approx(1.0, rel=0.02)
    assert float(a.W_out.std() * math.sqrt(300)) == pytest.approx(1.0, rel=0.05)
    assert a.W.requires_grad and not a.W_in.requires_grad


def test_fixed_point_fields():
    m = FixedPointRNN(40, 20, 5, dtype="float64", solver_kwargs={"tol": 1e-12})
    p = torch.rand(7, 20, dtype=torch.float64)
    fp = m.fixed_point(m.input(p))
    assert torch.allclose(fp.z, fp.r @ m.W.T + fp.x)
    assert torch.allclose(fp.r, torch.tanh(fp.z), atol=1e-12)
    assert torch.allclose(fp.gain, 1 - torch.tanh(fp.z) ** 2)
    assert fp.solution.n_nonconverged == 0 and m(p).shape == (7, 5)
    assert (m.stability(fp) < 1).all()


def test_truncated_bptt_gradient_approaches_w1():
    """Autograd through unrolled damped steps from the fixed point → the implicit gradient."""
    m = FixedPointRNN(20, 10, 4, dtype="float64", sigma_W=0.5, bptt_steps=200, bptt_damping=0.8,
                      solver_kwargs={"tol": 1e-13})
    p = torch.rand(6, 10, dtype=torch.float64)
    x = m.input(p)
    y = torch.randint(0, 4, (6,))
    r = m.layer.unrolled(x)
    loss = torch.nn.functional.cross_entropy(m.readout(r), y)
    loss.backward()
    fp = m.fixed_point(x)
    probs = torch.softmax(m.readout(fp.r), 1)
    D = (probs - torch.nn.functional.one_hot(y, 4)) @ m.W_out          # per-sample ∇_r L
    dW1 = rules.w1(m.W.detach(), fp.r, fp.gain, D, 1.0)
    assert float((m.W.grad + dW1).norm() / dW1.norm()) < 1e-8


def test_euler_bptt_unrolls_the_paper_protocol():
    m = FixedPointRNN(10, 5, 3, solver="euler", solver_kwargs={"dt": 0.01, "steps": 500}, dtype="float64")
    x = m.input(torch.rand(4, 5, dtype=torch.float64))
    with torch.no_grad():
        r = m.layer.unrolled(x)
    assert torch.allclose(r, m.fixed_point(x).r, atol=1e-14)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="N must be a positive integer, got 0"):
        FixedPointRNN(0)
    with pytest.raises(ValueError, match="solver 'direct' solves the linear model only"):
        FixedPointRNN(5, solver="direct", activation="tanh")
    with pytest.raises(ValueError, match=r"unknown dtype 'float16'"):
        FixedPointRNN(5, dtype="float16")
    m = FixedPointRNN(5, 3, 2)
    with pytest.raises(ValueError, match=r"input must be \(m, 3\), got shape \(2, 4\)"):
        m.input(torch.rand(2, 4))


def test_stability_probes_are_taken_at_solved_fixed_points():
    """Under the paper's fixed-step Euler protocol the state stops short of the fixed point;
    stability (eq 2.3) is evaluated where the fixed point is, solved on from there."""
    m = FixedPointRNN(40, 10, 3, solver="euler", solver_kwargs={"dt": 0.01, "steps": 50, "tol": None},
                      sigma_W=1.5, dtype="float64")
    x = m.input(torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    short = m.fixed_point(x)
    assert float(short.solution.residual.max()) > 1e-2          # 50 steps of dt 0.01: far from it
    fp = m.solved_fixed_point(x)
    W = m.W.detach()
    assert float((torch.tanh(fp.r @ W.T + x) - fp.r).abs().max()) <= 1e-5
    want = torch.linalg.eigvals(fp.gain[:, :, None] * W).real.amax(1)
    assert torch.allclose(m.stability(fp), want, rtol=1e-10, atol=1e-12)
    tol = FixedPointRNN(40, 10, 3, solver="euler", solver_kwargs={"dt": 0.5, "steps": 400, "tol": 1e-9},
                        sigma_W=0.5, dtype="float64")
    assert torch.equal(tol.solved_fixed_point(x).r, tol.fixed_point(x).r)   # its own solver suffices
