"""Stacked layers with trained read-in, read-out and biases: every gradient against autograd
through a converged unrolled solve written here by hand, every rule per layer against the core
rule, the reparameterized read-in against its per-sample formula, and the one-layer network
against the paper's initialisation."""
import math

import pytest
import torch
import torch.nn.functional as F

from fprnn.core import rules
from fprnn.models.dense import FixedPointRNN
from fprnn.training.run import build
from stack_reference import rule_step

from helpers import make_cfg

TIGHT = {"tol": 1e-13, "max_iter": 500}


def stack(seed=0, **kw):
    opts = dict(layers=[12, 9], n_in=7, n_out=4, dtype="float64", sigma_W=0.6, seed=seed,
                train_readin=True, train_readout=True, bias=True, solver_kwargs=TIGHT)
    opts.update(kw)
    net = FixedPointRNN(**opts)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():       # biases away from zero, so that their gradients mean something
        for t in (net.layers[0].b, net.layers[1].b, net.b_out):
            t.copy_(0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64))
    p = torch.randn(10, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (10,), generator=g)
    return net, p, y


def autograd_reference(net, p, y, steps=400):
    """Gradients of the mean loss by autograd through damped iterations started at each layer's
    fixed point (converged: the unrolled map's derivative is the implicit one to ~0.75^steps);
    also ∇ with respect to the rates r_1 that the second layer reads (δ_1, summed over samples)."""
    fps = net.fixed_points(p)
    params = dict(net.named_parameters())
    s = p
    inputs = []
    for layer, fp in zip(net.layers, fps):
        inputs.append(s)
        x = s @ layer.V.T + layer.b
        u = fp.r.clone()
        for _ in range(steps):
            u = u + 0.5 * (torch.tanh(u @ layer.W.T + x) - u)
        s = u
    loss = F.cross_entropy(s @ net.W_out.T + net.b_out, y)
    grads = torch.autograd.grad(loss, [*params.values(), inputs[1]])
    return dict(zip(params, grads[:-1])), grads[-1] * len(p), fps


def test_stack_gradients_equal_autograd_through_the_converged_solve():
    net, p, y = stack()
    step = rule_step(net, p, y, "classification", rules.w1, 1.0, [{}, {}])
    assert step.fault is None
    want, delta1, fps = autograd_reference(net, p, y)
    assert set(step.grads) == set(want) == {"layers.0.W", "layers.0.V", "layers.0.b", "layers.1.W",
                                            "layers.1.V", "layers.1.b", "W_out", "b_out"}
    for name, g in want.items():        # w1 with η = 1: −ΔW is ∇_W of the mean loss
        rel = float((step.grads[name] - g).norm() / g.norm())
        assert rel < 1e-8, (name, rel)
    assert float((step.deltas[0] - delta1).norm() / delta1.norm()) < 1e-8
    # the fixed points the gradients were taken at are fixed points
    for layer, fp in zip(net.layers, fps):
        assert float((torch.tanh(fp.r @ layer.W.detach().T + fp.x) - fp.r).abs().max()) < 1e-12


def test_stack_gradient_against_finite_differences_of_resolved_fixed_points():
    """The implicit gradient of V_1 (the deepest, credit through both layers) along a random
    direction, against central differences of the loss re-solved at V_1 ± εD."""
    net, p, y = stack(seed=3)
    step = rule_step(net, p, y, "classification", rules.w1, 1.0, [{}, {}])
    D = torch.randn(net.layers[0].V.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    V = net.layers[0].V.detach().clone()

    def J(t):
        with torch.no_grad():
            net.layers[0].V.copy_(V + t * D)
        return float(F.cross_entropy(net(p).detach(), y))

    eps = 1e-5
    fd = (J(eps) - J(-eps)) / (2 * eps)
    assert fd == pytest.approx(float((step.grads["layers.0.V"] * D).sum()), rel=1e-7)


@pytest.mark.parametrize("rule", ["w1", "w2", "w3", "w4", "jfb"])
def test_every_rule_per_layer_is_the_core_rule_on_that_layer(rule):
    net, p, y = stack(seed=1)
    lr = 0.05
    step = rule_step(net, p, y, "classification", rules.RULES[rule], lr, [{}, {}])
    assert step.fault is None
    for l, (layer, fp) in enumerate(zip(net.layers, step.fps)):
        want = rules.RULES[rule](layer.W.detach(), fp.r, fp.gain, step.deltas[l], lr)
        assert torch.allclose(step.grads[f"layers.{l}.W"], -want, rtol=0, atol=1e-15), (rule, l)
    # the credit handed down does not depend on the rule that moves the W's
    ref = rule_step(net, p, y, "classification", rules.w1, lr, [{}, {}])
    assert torch.allclose(step.deltas[0], ref.deltas[0], rtol=1e-12, atol=0)


def test_reparameterized_readin_is_its_per_sample_formula():
    """ΔV_ℓ ∝ −mean_i (I − W G_i) G_i δ_i s_iᵀ, built here with explicit N×N matrices."""
    net, p, y = stack(seed=2)
    step = rule_step(net, p, y, "classification", rules.w3, 0.1, [{}, {}], readin="reparam")
    inputs = [p, step.fps[0].r]
    for l, layer in enumerate(net.layers):
        W, fp, delta = layer.W.detach(), step.fps[l], step.deltas[l]
        I = torch.eye(W.shape[0], dtype=W.dtype)
        a = [(I - W @ torch.diag(g)) @ torch.diag(g) @ d for g, d in zip(fp.gain, delta)]
        want_V = sum(torch.outer(ai, si) for ai, si in zip(a, inputs[l])) / len(p)
        want_b = sum(a) / len(p)
        assert torch.allclose(step.grads[f"layers.{l}.V"], want_V, rtol=1e-12, atol=1e-15)
        assert torch.allclose(step.grads[f"layers.{l}.b"], want_b, rtol=1e-12, atol=1e-15)
    # W = 0 turns it into the gradient (both are G δ sᵀ there)
    with torch.no_grad():
        for layer in net.layers:
            layer.W.zero_()
    a = rule_step(net, p, y, "classification", rules.w3, 0.1, [{}, {}], readin="reparam")
    b = rule_step(net, p, y, "classification", rules.w3, 0.1, [{}, {}], readin="gradient")
    for l in range(2):
        assert torch.allclose(a.grads[f"layers.{l}.V"], b.grads[f"layers.{l}.V"], rtol=1e-12, atol=1e-16)


def test_one_layer_draws_the_papers_initial_weights():
    """W = σ_W Z/√N, then W_in = Z/√n_in, then W_out = Z/√N, from one generator of float64
    normals (W scaled after the cast to float32, as the paper's network always was)."""
    net = FixedPointRNN(50, 30, 10, sigma_W=0.5, seed=7)
    g = torch.Generator().manual_seed(7)
    W = 0.5 * torch.randn(50, 50, generator=g, dtype=torch.float64).float() / math.sqrt(50)
    W_in = torch.randn(50, 30, generator=g, dtype=torch.float64) / math.sqrt(30)
    W_out = torch.randn(10, 50, generator=g, dtype=torch.float64) / math.sqrt(50)
    assert torch.equal(net.W.detach(), W) and torch.equal(net.W_in, W_in.float())
    assert torch.equal(net.W_out, W_out.float())
    assert [n for n, _ in net.named_parameters()] == ["layers.0.W"]       # nothing else learns


def test_stack_arguments_are_checked():
    with pytest.raises(ValueError, match=r"give the layer sizes once: N \(one layer\) or layers"):
        FixedPointRNN(300, 784, 10, layers=[300, 300])
    with pytest.raises(ValueError, match=r"layers must be a non-empty list of positive integers, got \[300, 0\]"):
        FixedPointRNN(None, 784, 10, layers=[300, 0])
    with pytest.raises(ValueError, match=r"activation lists 3 values for 2 layers"):
        FixedPointRNN(None, 784, 10, layers=[30, 20], activation=["tanh", "relu", "tanh"])
    with pytest.raises(ValueError, match="a stack of 2 layers needs a read-in: set n_in"):
        FixedPointRNN(None, None, 10, layers=[30, 20])
    with pytest.raises(ValueError, match="train_readout=true needs a read-out to train: set n_out"):
        FixedPointRNN(30, 5, None, train_readout=True)
    net = FixedPointRNN(None, 5, 3, layers=[8, 6], activation=["tanh", "relu"])
    assert [layer.act.name for layer in net.layers] == ["tanh", "relu"]
    with pytest.raises(ValueError, match=r"this network has 2 layers: use layers\[ℓ\]"):
        net.W


STACK_CFG = ["progress_bar=false", "logger=csv", "data.train_subset=256", "data.batch_size=256",
             "data.val_size=0", "data.test_subset=100", "data.shuffle=false", "trainer.max_steps=1",
             "trainer.limit_val_batches=0", "model.dtype=float64", "solver.kwargs.tol=1e-12",
             "model.layers=[30,20]", "model.train_readin=true", "model.train_readout=true",
             "model.bias=true", "lr_readin=0.5", "lr_readout=0.25"]


@pytest.mark.parametrize("rule,readin", [("w3", "reparam"), ("w1", "gradient"), ("bptt", "gradient")])
def test_one_training_step_of_a_stack_moves_every_tensor_by_its_group(tmp_path, mnist_dir, rule, readin):
    """Through Lightning, SGD: each W by the rule's ΔW (group lr 1), read-ins by −0.5 × their
    update, the read-out by −0.25 × its gradient — all from the first batch at the initial weights.
    bptt (300 damped steps) against the implicit gradients."""
    lr = 0.05
    cfg = make_cfg([*STACK_CFG, f"rule={rule}", f"lr={lr}", f"module.readin={readin}",
                    "model.bptt_steps=300", "model.bptt_damping=0.9"], tmp_path, mnist_dir)
    data, model, module, trainer = build(cfg, tmp_path)
    data.setup()
    p, y = data.train_set.tensors[0][:256].double(), data.train_set.tensors[1][:256]
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    want = rule_step(model, p, y, "classification", rules.RULES["w1" if rule == "bptt" else rule], lr,
                     [{}, {}], readin=readin).grads
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1 and module.record.faults == 0
    group_lr = {"V": 0.5, "b": 0.5, "W_out": 0.25, "b_out": 0.25, "W": 1.0}
    tol = 1e-6 if rule == "bptt" else 1e-10
    for name, t in model.named_parameters():
        expected = -group_lr[name.split(".")[-1]] * want[name]
        got = t.detach() - before[name]
        assert float((got - expected).norm() / expected.norm()) < tol, name


def test_a_stack_logs_and_reports_every_layer(tmp_path, mnist_dir):
    """The README's promise: with a stack the monitors log stability/…/ℓ, angle/…/ℓ, solver/…/ℓ
    and results.json holds each layer's stability beside the worst layer's."""
    import csv
    import json

    from fprnn.training.run import train
    over = [o for o in STACK_CFG if not o.startswith("trainer.max_steps")]
    train(make_cfg([*over, "rule=w3", "lr=0.05", "trainer.max_steps=2", "callbacks.stability.every_n_steps=1",
                    "callbacks.angles.every_n_steps=1"], tmp_path, mnist_dir))
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        keys = set(next(csv.reader(fh)))
    for l in (0, 1):
        assert {f"stability/max_re_eig/{l}", f"stability/frac_stable/{l}", f"angle/theta13/{l}",
                f"solver/iters/{l}"} <= keys, sorted(keys)
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["max_re_eig"] == max(res["max_re_eig/0"], res["max_re_eig/1"])
    assert res["params"] == {"W": 30 * 30 + 20 * 20, "readin": 30 * 784 + 30 + 20 * 30 + 20, "readout": 10 * 20 + 10}
