"""fprnn.models.layer.FixedPointLayer in a user's own model: the two examples of docs/guides/own-model.md
run as written (on a few MNIST images), the loss falls, and one step's W.grad is the rule's −ΔW computed by
fprnn.core.rules on per-sample errors that autograd gives independently."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fprnn.core import rules
from fprnn.models.layer import FixedPointLayer

README = Path(__file__).resolve().parents[1] / "docs" / "guides" / "own-model.md"


def readme_block(first_line: str) -> str:
    blocks = re.findall(r"```(?:python|\{\.python[^}]*\})\n(.*?)```", README.read_text(), re.S)
    (code,) = [b for b in blocks if b.startswith(first_line)]
    return code


@pytest.fixture(scope="module")
def trained(request):
    from conftest import mnist_root
    root = mnist_root()
    if root is None:
        pytest.skip("MNIST raw files not found (set FPRNN_DATA)")
    code = readme_block("# your own model, plain PyTorch")
    setting = 'root, n_images, epochs = "data", 2_560, 1'
    assert setting in code
    torch.manual_seed(0)
    ns: dict = {"__name__": "readme_example"}
    exec(code.replace(setting, f'root, n_images, epochs = "{root}", 2_560, 1'), ns)
    return ns


def test_the_plain_pytorch_example_trains(trained):
    losses = trained["losses"]
    assert len(losses) == 20
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.6 * first, (first, last)


def test_one_step_w_grad_is_the_rule_on_per_sample_errors(trained):
    model, loader = trained["model"], trained["loader"]
    images, labels = next(iter(loader))
    model.zero_grad()
    out = model(images)
    layer = model.recurrent
    assert bool(layer.report.used.all())
    F.cross_entropy(out, labels).backward()
    fp = layer.report.fixed_point
    # independent per-sample errors δ_i = ∂L_i/∂r_i at the fixed point, by autograd on the read-out
    r = fp.r.detach().clone().requires_grad_()
    (delta,) = torch.autograd.grad(F.cross_entropy(model.readout(r), labels, reduction="sum"), r)
    want = -rules.w3(layer.W.detach(), fp.r, fp.gain, delta, 1.0)
    rel = float((layer.W.grad - want).norm() / want.norm())
    assert rel < 1e-5, rel
    # the encoder got the exact gradient: the implicit adjoint, against autograd through a
    # converged unrolled solve from the fixed point
    s = model.encoder(images).detach().requires_grad_()
    x = s @ layer.V.T
    u = fp.r.detach()
    for _ in range(300):
        u = u + 0.5 * (torch.tanh(u @ layer.W.T + x) - u)
    (ref,) = torch.autograd.grad(F.cross_entropy(model.readout(u), labels), s)
    s2 = s.detach().requires_grad_()
    (got,) = torch.autograd.grad(F.cross_entropy(model.readout(layer(s2)), labels), s2)
    assert float((got - ref).norm() / ref.norm()) < 1e-4


def test_the_lightning_example_trains(trained):
    code = readme_block("# the same model in Lightning")
    ns = dict(trained)
    before = {n: t.detach().clone() for n, t in ns["ConvRecurrent"]().named_parameters()}
    exec(code, ns)
    lit = ns["lit"]
    moved = [n for n, t in lit.model.named_parameters() if not torch.equal(t.detach(), before[n])]
    assert "recurrent.W" in moved and "encoder.0.weight" in moved and "readout.weight" in moved
    # it trained: better than the untrained module on the images it saw
    images, labels = next(iter(ns["loader"]))
    with torch.no_grad():
        fresh = F.cross_entropy(ns["ConvRecurrent"]()(images), labels)
        now = F.cross_entropy(lit.model(images), labels)
    assert float(now) < 0.6 * float(fresh), (float(fresh), float(now))


def test_w2_with_sgd_at_lr_1_takes_the_exact_step():
    """eta is w2's step: SGD with lr = 1 moves W by exactly ΔW2 of eq 2.17 (per-sample formula)."""
    torch.manual_seed(1)
    layer = FixedPointLayer(8, n_in=5, rule="w2", eta=0.05, dtype="float64", train_readin=False, seed=3)
    s, target = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    W0 = layer.W.detach().clone()
    opt = torch.optim.SGD([layer.W], lr=1.0)
    loss = ((layer(s) - target) ** 2).sum(1).mean()
    loss.backward()
    opt.step()
    fp = layer.report.fixed_point
    I = torch.eye(8, dtype=torch.float64)
    step = torch.zeros_like(W0)
    for i in range(6):
        G, d = torch.diag(fp.gain[i]), 2 * (fp.r[i] - target[i])
        a, c = (I - W0 @ G) @ G @ d, (I - G @ W0) @ fp.r[i]
        step += -0.05 * torch.outer(a, (I - G @ W0).T @ c) / (1 - 0.05 * c @ G @ a) / 6
    assert torch.allclose(layer.W.detach() - W0, step, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("kw, match", [(dict(N=0), "N must be"), (dict(N=4, n_in=-1), "n_in must be"),
                                       (dict(N=4, rule="adam"), "unknown rule"),
                                       (dict(N=4, eta=float("nan")), "eta")])
def test_bad_arguments_name_the_value(kw, match):
    with pytest.raises(ValueError, match=match):
        FixedPointLayer(**kw)


def test_a_wrong_input_shape_names_the_shapes():
    layer = FixedPointLayer(4, n_in=3)
    with pytest.raises(ValueError, match=r"\(m, 3\), got shape \(2, 4\)"):
        layer(torch.zeros(2, 4))
