"""Convolutional recurrent connectivity (fprnn.core.operators.Conv2d, fprnn.models.conv): the rules on a kernel
against the dense rules on the materialized conv matrix, w1 against autograd through the unrolled
solve, the layer's checks, and the presets end to end."""
import pytest
import torch

from fprnn.core import operators, rules, solvers
from fprnn.models.conv import ConvFixedPointLayer, ConvRecurrentNet, spectral_radius
from fprnn.training.run import train
from helpers import QUICK_MNIST, make_cfg

C, H, K_SIZE = 3, 6, 3
D = torch.float64
PADS = ["zeros", "circular"]


def conv_matrix(K: torch.Tensor, padding: str, size=(H, H)) -> torch.Tensor:
    """W (N×N) of the size-keeping convolution with K on maps of ``size``, written entry by entry
    from the definition (W r)[o, y, x] = Σ_{c,a,b} K[o, c, a, b] r[c, y + a − p, x + b − p] —
    independent of fprnn.core.operators — and differentiable in K."""
    (Hy, Wx), p = size, K.shape[2] // 2
    n = C * Hy * Wx
    rows, cols, kidx = [], [], []
    for o in range(C):
        for y in range(Hy):
            for x in range(Wx):
                for c in range(C):
                    for a in range(K_SIZE):
                        for b in range(K_SIZE):
                            yy, xx = y + a - p, x + b - p
                            if padding == "circular":
                                yy, xx = yy % Hy, xx % Wx
                            elif not (0 <= yy < Hy and 0 <= xx < Wx):
                                continue
                            rows.append((o * Hy + y) * Wx + x)
                            cols.append((c * Hy + yy) * Wx + xx)
                            kidx.append(((o * C + c) * K_SIZE + a) * K_SIZE + b)
    W = torch.zeros(n, n, dtype=K.dtype)
    return W.index_put((torch.tensor(rows), torch.tensor(cols)), K.flatten()[torch.tensor(kidx)], accumulate=True)


def adjoint(K: torch.Tensor, padding: str, dW: torch.Tensor, size=(H, H)) -> torch.Tensor:
    """Mᵀ(ΔW) for the linear map M: K ↦ W, by autograd: the gradient of ⟨M(K), ΔW⟩ in K."""
    Kv = K.clone().requires_grad_(True)
    (conv_matrix(Kv, padding, size) * dW).sum().backward()
    return Kv.grad


def kernel(scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(C, C, K_SIZE, K_SIZE, generator=g, dtype=D) / (C * K_SIZE ** 2) ** 0.5


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("padding", PADS)
def test_the_conv_operator_is_its_matrix(padding):
    K = kernel(1.0)
    op, W = operators.Conv2d(K, (H, H), padding), conv_matrix(K, padding)
    R, P = torch.randn(5, C * H * H, dtype=D), torch.randn(5, C * H * H, dtype=D)
    assert rel(op(R), R @ W.T) < 1e-14 and rel(op.T(P), P @ W) < 1e-14
    assert rel(op.outer(P, R), adjoint(K, padding, P.T @ R)) < 1e-13
    assert torch.equal(op.matrix(), op(torch.eye(C * H * H, dtype=D)).T) and rel(op.matrix(), W) < 1e-15


@pytest.mark.parametrize("padding", PADS)
def test_channels_last_rows_are_the_same_operator_permuted(padding):
    K = kernel(1.0)
    chw, hwc = operators.Conv2d(K, (H, H), padding), operators.Conv2d(K, (H, H), padding, layout="hwc")
    perm = torch.arange(C * H * H).view(C, H, H).permute(1, 2, 0).flatten()    # hwc row j = chw entry perm[j]
    R, P = torch.randn(5, C * H * H, dtype=D), torch.randn(5, C * H * H, dtype=D)
    assert rel(hwc(R[:, perm]), chw(R)[:, perm]) < 1e-14 and rel(hwc.T(P[:, perm]), chw.T(P)[:, perm]) < 1e-14
    assert rel(hwc.outer(P[:, perm], R[:, perm]), chw.outer(P, R)) < 1e-14
    assert rel(hwc.matrix(), conv_matrix(K, padding)[perm][:, perm]) < 1e-15
    X = torch.randn(2, C, H, H, dtype=D)
    assert torch.equal(hwc.maps(hwc.rows(X)), X) and torch.equal(hwc.rows(X), X.flatten(1)[:, perm])


@pytest.mark.parametrize("rule", ["w3", "bptt"])
def test_the_layer_is_the_same_in_either_layout(rule):
    x = torch.randn(3, C, H, H, dtype=D)
    out = {}
    for layout in ("chw", "hwc"):
        layer = ConvFixedPointLayer(C, (H, H), rule=rule, dtype="float64", sigma_W=0.9, layout=layout,
                                    solver_kwargs={"tol": 1e-13})
        xv = x.clone().requires_grad_(True)
        r = layer(xv)
        (r ** 3).sum().backward()
        out[layout] = r.detach(), layer.W.grad, xv.grad
    for a, b in zip(out["chw"], out["hwc"]):
        assert rel(a, b) < 1e-12


@pytest.mark.parametrize("size", [(H, H), (4, 7), (7, 3)])
@pytest.mark.parametrize("padding", PADS)
@pytest.mark.parametrize("rule", ["w1", "w2", "w3", "w4", "jfb"])
def test_every_rules_kernel_step_is_the_adjoint_of_its_dense_step(rule, padding, size):
    K, m, n = kernel(0.8), 7, C * size[0] * size[1]
    op, W = operators.Conv2d(K, size, padding), conv_matrix(K, padding, size)
    g = torch.Generator().manual_seed(1)
    r = torch.rand(m, n, generator=g, dtype=D) * 2 - 1
    gain = 1 - r ** 2                      # tanh's gains at rates r
    delta = torch.randn(m, n, generator=g, dtype=D)
    lr = 0.05
    # w1 at the tolerance the comparison asks for (its default is 1000 ε)
    dK, info = rules.RULES[rule](op, r, gain, delta, lr, return_info=True, **({"tol": 1e-15} if rule == "w1" else {}))
    dW = rules.RULES[rule](W, r, gain, delta, lr, **({"shared_gain": False} if rule == "w2" else {}))
    assert dK.shape == K.shape and rel(dK, adjoint(K, padding, dW, size)) < 1e-12
    if rule == "w2":
        assert info["out_of_domain"] == 0
    if rule == "w1":
        assert info["converged"]


@pytest.mark.parametrize("padding", PADS)
def test_w1_is_autograd_through_the_unrolled_conv_solve(padding):
    layer = ConvFixedPointLayer(C, (H, H), K_SIZE, padding, rule="w1", dtype="float64", sigma_W=0.9,
                                solver_kwargs={"tol": 1e-13, "max_iter": 500})
    x = torch.randn(4, C, H, H, dtype=D, requires_grad=True)
    target = torch.randn(4, C, H, H, dtype=D)
    loss = ((layer(x) - target) ** 2).sum(dim=(1, 2, 3)).mean()
    loss.backward()
    assert bool(layer.report.used.all())
    # the reference: autograd through 400 plain iterations r ← tanh(K ⋆ r + x) from rest
    Kv, xv = layer.W.detach().clone().requires_grad_(True), x.detach().clone().requires_grad_(True)
    op, s = operators.Conv2d(Kv, (H, H), padding), xv.flatten(1)
    u = torch.zeros_like(s)
    for _ in range(400):
        u = torch.tanh(op(u) + s)
    ((u.view_as(target) - target) ** 2).sum(dim=(1, 2, 3)).mean().backward()
    assert rel(layer.W.grad, Kv.grad) < 1e-9 and rel(x.grad, xv.grad) < 1e-9


def test_the_matrix_free_adjoint_solves_slow_contractions_like_lu():
    K, m = kernel(1.0, seed=3), 6
    W = conv_matrix(K, "circular")
    gain = torch.full((m, C * H * H), 1.0, dtype=D) * torch.linspace(0.6, 1.0, C * H * H, dtype=D)
    rho = float(torch.linalg.eigvals(gain[0].unsqueeze(1) * W).abs().max())
    gain = gain * (0.98 / rho)             # ρ(G W) = 0.98: the plain iteration would need ~1,500 steps
    delta = torch.randn(m, C * H * H, dtype=D)
    P, info = rules.implicit_adjoint(operators.Conv2d(K, (H, H), "circular"), gain, delta)
    P_lu, _ = rules.implicit_adjoint(W, gain, delta, method="exact")
    assert info["converged"] and info["anderson_samples"] == m and rel(P, P_lu) < 1e-10
    assert 50 < info["iters"] < 1_500                    # 50 plain steps, then Anderson's, counted
    easy, info = rules.implicit_adjoint(operators.Conv2d(K, (H, H), "circular"), gain * 0.3, delta)
    assert info["converged"] and "anderson_samples" not in info and 0 < info["iters"] < 50
    assert rel(easy, rules.implicit_adjoint(W, gain * 0.3, delta, method="exact")[0]) < 1e-10


def test_the_fallback_follows_the_dynamics_matrix_free():
    """Samples the solver leaves (here: every one, after 3 plain iterations) are settled by the
    error-controlled Runge–Kutta fallback at the fixed point that the dynamics dr/dt = −r + f(K ⋆ r + x)
    reach from rest (long fixed-step Euler of those dynamics), each flagged as handed over."""
    layer = ConvFixedPointLayer(C, (H, H), solver="iterate", solver_kwargs={"tol": 1e-11, "max_iter": 3},
                                fallback={"method": "rk23", "max_share": 1.0}, dtype="float64")
    layer.W.data.copy_(kernel(2.0, seed=2))
    x = layer.rows(torch.randn(4, C, H, H, generator=torch.Generator().manual_seed(3), dtype=D))
    fp = layer.fixed_point(x)
    sol = fp.solution
    assert bool(sol.fallback.all() and sol.converged.all()) and sol.solver == "iterate+rk23"
    ref = solvers.follow_euler(layer._state_map(layer.operator(), x), torch.zeros_like(x), tol=1e-12, dt=0.02,
                               steps=200_000)
    assert bool(ref.converged.all()) and float((fp.r - ref.u).abs().max()) <= 1e-6


@pytest.mark.parametrize("padding", PADS)
def test_stability_is_the_spectral_radius_of_g_w(padding):
    K = kernel(2.0, seed=5)
    gain = torch.rand(3, C * H * H, dtype=D)
    lam = torch.linalg.eigvals(gain.unsqueeze(-1) * conv_matrix(K, padding)).abs().amax(-1)
    est = spectral_radius(operators.Conv2d(K, (H, H), padding), gain, iters=400)
    assert float(((est - lam) / lam).abs().max()) < 0.02


def test_bad_settings_are_named():
    for kw, what in [({"padding": "reflect"}, "unknown padding 'reflect'"), ({"kernel": 4}, "kernel must be an odd"),
                     ({"rule_kwargs": {"metric": "batch"}}, "needs W as a matrix"),
                     ({"rule": "w2", "rule_kwargs": {"shared_gain": True}}, "needs W as a matrix"),
                     ({"rule": "w1", "rule_kwargs": {"method": "exact"}}, "method='exact'"),
                     ({"fallback": {"method": "ptc"}}, "N×N Jacobians"), ({"solver": "direct"}, "not one for a conv"),
                     ({"rule": "w5"}, "unknown rule 'w5'")]:
        with pytest.raises(ValueError, match=what):
            ConvFixedPointLayer(C, (H, H), **{"kernel": 3, **kw})
    with pytest.raises(ValueError, match=r"must be \(m, 3, 6, 6\)"):
        ConvFixedPointLayer(C, (H, H))(torch.zeros(2, 3, 5, 5))
    with pytest.raises(ValueError, match="do not divide"):
        ConvRecurrentNet((1, 28, 28), stem_pool=3)
    with pytest.raises(ValueError, match="head_channels must be a positive integer, got -1"):
        ConvRecurrentNet((1, 28, 28), head_channels=-1)
    with pytest.raises(ValueError, match="head_kernel must be an odd positive integer, got 2"):
        ConvRecurrentNet((1, 28, 28), head_channels=4, head_kernel=2)
    with pytest.raises(ValueError, match="needs W as a matrix"):
        rules.w3(operators.Conv2d(kernel(1.0), (H, H)), *torch.rand(3, 2, C * H * H, dtype=D), 0.1, metric="batch")


@pytest.mark.parametrize("rule", ["w3", "bptt"])
def test_the_mnist_preset_trains_the_kernel_and_loads_back(tmp_path, mnist_dir, rule):
    over = [*QUICK_MNIST, "experiment=convrec_mnist", f"rule={rule}", "data.val_size=256",
            "data.train_subset=512", "data.test_subset=256", "data.batch_size=64", "model.channels=8"]
    res = train(make_cfg(over, tmp_path, mnist_dir))
    assert res["status"] == "finished" and res["faults"] == 0 and res["test_acc"] > 0.3, res   # 8 steps; chance 0.1
    assert res["max_re_eig"] < 1 and res["params"]["W"] == 8 * 8 * 9
    net = ConvRecurrentNet.load(tmp_path)
    fresh = ConvRecurrentNet(**net.config)
    assert not torch.equal(net.layer.W, fresh.layer.W) and not torch.equal(net.stem[0].weight, fresh.stem[0].weight)
    p = torch.rand(5, 784)
    with torch.no_grad():
        assert torch.equal(ConvRecurrentNet.load(tmp_path)(p), net(p))


def test_the_feed_forward_baseline_keeps_k_at_zero_and_trains_the_fashion_head(tmp_path, mnist_dir):
    over = [*QUICK_MNIST, "experiment=convrec_fashion", "data=mnist", "model.recurrent=false", "data.val_size=0",
            "data.train_subset=256", "data.test_subset=128", "data.batch_size=64", "model.channels=4"]
    res = train(make_cfg(over, tmp_path, mnist_dir))
    net = ConvRecurrentNet.load(tmp_path)
    assert res["status"] == "finished" and not bool(net.layer.W.any())
    assert res["solver_iters_mean"] <= 2          # r = tanh(x): one evaluation reaches it
    # the preset's conv head (64 maps, 3×3, on the 2×2-pooled 4×14×14 maps) trains with the read-out
    assert res["params"]["readout"] == (4 * 9 + 1) * 64 + (64 * 7 * 7 + 1) * 10
    head = net.head[0].weight
    assert not torch.equal(head, ConvRecurrentNet(**net.config).head[0].weight)
    with torch.no_grad():
        r = net.layer(net.features(p := torch.rand(5, 784)))
        reference = torch.relu(torch.nn.functional.conv2d(torch.nn.functional.avg_pool2d(r, 2), head,
                                                          net.head[0].bias, padding=1))
        assert torch.allclose(net(p), reference.flatten(1) @ net.W_out.T + net.b_out, atol=1e-6)
