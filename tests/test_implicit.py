"""The rules as autograd's backward (fprnn.core.implicit): every trained tensor's .grad after
loss.backward() against the hand-computed step fprnn trained with before (tests/stack_reference.py) for a 2-layer
stack with trained read-ins, read-out and biases, under every rule and both read-in modes, with
unconverged samples left out; w2's normalisation; faults; when the graph is attached."""
import pytest
import torch
import torch.nn.functional as F

from fprnn.core import implicit, rules
from fprnn.core.implicit import FixedPointFault, RuleBackward
from fprnn.models.dense import FixedPointRNN
from stack_reference import bptt_step, rule_step

TIGHT = {"tol": 1e-13, "max_iter": 500}
RULE_LR = {"w1": 0.7, "w2": 0.05, "w3": 0.7, "w4": 0.7, "jfb": 0.7}


def stack(seed=0, m=40, **kw):
    opts = dict(layers=[12, 9], n_in=7, n_out=4, dtype="float64", sigma_W=0.6, seed=seed,
                train_readin=True, train_readout=True, bias=True, solver_kwargs=TIGHT, fallback=None)
    opts.update(kw)
    net = FixedPointRNN(**opts)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for t in [layer.b for layer in net.layers if layer.b is not None] + [net.b_out] * net.bias:
            t.copy_(0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64))
    p = torch.randn(m, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (m,), generator=g)
    return net, p, y


def autograd_grads(net, p, y):
    """forward → torch's cross-entropy on the samples used → backward: every parameter's .grad."""
    for t in net.parameters():
        t.grad = None
    out = net(p)
    used = net.used
    net.set_loss_norm(int(used.sum()))       # the loss below is the mean over the samples used
    F.cross_entropy(out[used], y[used]).backward()
    return {n: t.grad for n, t in net.named_parameters()}, used


def assert_close(got, want, tol):
    assert set(got) == set(want)
    for name in want:
        rel = float((got[name] - want[name]).norm() / want[name].norm())
        assert rel <= tol, (name, rel)


@pytest.mark.parametrize("readin", ["gradient", "reparam"])
@pytest.mark.parametrize("rule", ["w1", "w2", "w3", "w4", "jfb"])
def test_every_tensor_equals_the_hand_computed_step(rule, readin):
    net, p, y = stack()
    net.set_backward(rule, RULE_LR[rule], readin=readin)
    got, used = autograd_grads(net, p, y)
    assert bool(used.all())
    want = rule_step(net, p, y, "classification", rules.get_rule(rule), RULE_LR[rule], [{}, {}], readin=readin)
    assert want.fault is None
    assert_close(got, want.grads, 1e-12)


@pytest.mark.parametrize("readin", ["gradient", "reparam"])
@pytest.mark.parametrize("rule", ["w1", "w2", "w3"])
def test_unconverged_samples_are_left_out_as_the_hand_step_leaves_them(rule, readin):
    # a solver budget too small for some samples: each layer leaves its own
    net, p, y = stack(seed=2, solver_kwargs={"tol": 1e-10, "max_iter": 15}, sigma_W=0.9)
    net.set_backward(rule, RULE_LR[rule], readin=readin)
    got, used = autograd_grads(net, p, y)
    left = int((~used).sum())
    assert 5 <= left <= 35, left
    assert any(bool(layer.report.used.all()) is False for layer in net.layers)
    want = rule_step(net, p, y, "classification", rules.get_rule(rule), RULE_LR[rule], [{}, {}],
                     readin=readin, max_nonconverged=1.0)
    assert want.n_used == len(p) - left
    assert_close(got, want.grads, 1e-12)


def test_bptt_equals_the_hand_bptt_step():
    net, p, y = stack(m=12)
    net.set_backward("bptt", 0.3)
    for t in net.parameters():
        t.grad = None
    F.cross_entropy(net(p), y).backward()
    got = {n: t.grad.clone() for n, t in net.named_parameters()}
    want = bptt_step(net, p, y, "classification", 0.3, lambda loss: loss.backward())
    assert_close(got, want.grads, 1e-12)


def test_w2_needs_the_loss_normalisation_and_the_linear_rules_do_not():
    """A summed loss (n = 1) gives m times the mean loss's W.grad exactly when w2 is told n;
    w3 needs nothing. W.grad of w2 equals the per-sample formula −Σ_i ΔW2_i / n."""
    net, p, y = stack(m=16, layers=[10], train_readin=False, bias=False)
    m = len(p)

    def wgrad(rule, reduction, loss_norm):
        net.set_backward(rule, RULE_LR[rule], loss_norm=loss_norm)
        net.layer.W.grad = None
        F.cross_entropy(net(p), y, reduction=reduction).backward()
        return net.layer.W.grad.clone()

    mean_w2 = wgrad("w2", "mean", None)
    assert torch.allclose(wgrad("w2", "sum", 1), m * mean_w2, rtol=1e-12, atol=0)
    told_wrong = wgrad("w2", "sum", None)        # n taken as m while the loss is a sum
    assert float((told_wrong - m * mean_w2).norm() / (m * mean_w2).norm()) > 1e-4
    assert torch.allclose(wgrad("w3", "sum", None), m * wgrad("w3", "mean", None), rtol=1e-12, atol=0)
    # independent: per-sample δ_i = W_outᵀ (softmax − onehot), eq 2.17 sample by sample
    fp = net.fixed_points(p)[-1]
    W, eta = net.layer.W.detach(), RULE_LR["w2"]
    delta = (torch.softmax(net.readout(fp.r), 1) - F.one_hot(y, 4)) @ net.W_out
    total = torch.zeros_like(W)
    for i in range(m):
        G = torch.diag(fp.gain[i])
        I = torch.eye(len(W), dtype=W.dtype)
        a = (I - W @ G) @ G @ delta[i]
        c = (I - G @ W) @ fp.r[i]
        total += -eta * torch.outer(a, (I - G @ W).T @ c) / (1 - eta * c @ G @ a)
    assert torch.allclose(mean_w2, -total / m, rtol=1e-12, atol=1e-15)


def test_a_fault_raises_in_backward_or_is_recorded_with_zero_gradients():
    net, p, y = stack(m=16)
    net.set_backward("w2", 1e6)                # far outside w2's domain
    with pytest.raises(FixedPointFault, match="w2 left its domain"):
        F.cross_entropy(net(p), y).backward()
    net.set_backward("w2", 1e6, throw=False)
    for t in net.parameters():
        t.grad = None
    F.cross_entropy(net(p), y).backward()
    assert "w2 left its domain" in net.layers[1].report.fault
    for l in range(2):                         # the faulting layer's call and everything below it: zero
        for name in ("W", "V", "b"):
            assert float(getattr(net.layers[l], name).grad.abs().max()) == 0, (l, name)
    assert float(net.W_out.grad.abs().max()) > 0          # autograd's own, above the fixed point


def test_the_graph_is_attached_whenever_autograd_records():
    net, p, y = stack(m=8)
    net.eval()                                  # eval mode still trains through it (TorchDEQ's pitfall)
    out = net(p)
    assert out.requires_grad
    with torch.no_grad():
        assert not net(p).requires_grad
        assert torch.equal(net(p), out.detach())


@pytest.mark.parametrize("bad, match", [(dict(eta=0), "eta"), (dict(rule="w9"), "unknown rule"),
                                        (dict(readin="x"), "readin"), (dict(throw="record"), "throw must be true"),
                                        (dict(loss_norm=-1), "loss_norm")])
def test_bad_backward_options_name_the_value(bad, match):
    with pytest.raises(ValueError, match=match):
        RuleBackward(**bad)


def test_finite_checks_agree_with_the_entrywise_test_also_when_a_sum_overflows():
    big = torch.finfo(torch.float32).max
    t = torch.ones(5, 3)
    t[1, 0], t[2, 2], t[3, 1] = float("nan"), float("inf"), -float("inf")
    t[4] = big                                        # finite entries whose sum is inf
    assert implicit.finite_rows(t).tolist() == torch.isfinite(t).all(1).tolist() == [True, False, False, False, True]
    assert not implicit.all_finite(t)
    assert implicit.all_finite(t[[0, 4]]) and torch.isinf(t[[0, 4]].sum())
    assert not implicit.all_finite(t[[0, 3]]) and not implicit.all_finite(t[[0, 1]])
