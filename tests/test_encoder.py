"""A convolutional front end before the fixed-point layer: its gradient (through the layer's
implicit adjoint) against autograd through a converged unrolled solve; the preset composes,
trains the encoder and loads back; bad specs name the value."""
import pytest
import torch
import torch.nn.functional as F

from fprnn.models.encoders import ConvEncoder, build_encoder
from fprnn.models.dense import FixedPointRNN
from fprnn.training.run import train

from helpers import QUICK_MNIST, make_cfg

SPEC = {"kind": "conv", "in_shape": [1, 8, 8], "channels": [3, 4], "kernel": 3}


def small(rule="w1"):
    net = FixedPointRNN(N=10, n_in=64, n_out=3, encoder=SPEC, dtype="float64", sigma_W=0.6, seed=2,
                        train_readin=True, train_readout=True, bias=True,
                        solver_kwargs={"tol": 1e-13, "max_iter": 500}, fallback=None)
    net.set_backward(rule, 1.0)
    g = torch.Generator().manual_seed(5)
    return net, torch.rand(12, 64, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)


def test_the_encoder_gets_the_gradient_of_the_loss_through_the_fixed_point():
    net, p, y = small()
    F.cross_entropy(net(p), y).backward()
    got = {n: t.grad.clone() for n, t in net.named_parameters()}
    assert {n for n in got if n.startswith("encoder.")} == {"encoder.net.0.weight", "encoder.net.0.bias",
                                                              "encoder.net.3.weight", "encoder.net.3.bias"}
    # reference: autograd through damped iterations started at the fixed point (converged: the
    # unrolled map's derivative is the implicit one to ~0.75^400)
    net.zero_grad()
    layer = net.layers[0]
    fp = net.fixed_points(p)[0]
    x = net.encoder(p) @ layer.V.T + layer.b
    u = fp.r.clone()
    for _ in range(400):
        u = u + 0.5 * (torch.tanh(u @ layer.W.T + x) - u)
    F.cross_entropy(net.readout(u), y).backward()
    for name, t in net.named_parameters():
        rel = float((got[name] - t.grad).norm() / t.grad.norm())
        assert rel < 1e-9, (name, rel)


def test_encoder_shapes_and_bad_specs():
    enc = ConvEncoder([3, 32, 32], channels=[8, 16, 16], kernel=5)
    assert enc.out_features == 16 * 4 * 4 and enc(torch.zeros(2, 3 * 32 * 32)).shape == (2, 256)
    assert build_encoder({"kind": "none"}) is None and build_encoder(None) is None
    for spec, match in [({"kind": "rnn"}, "kind one of"), ({"kind": "conv", "in_shape": [28, 28]}, "in_shape"),
                        ({"kind": "conv", "in_shape": [1, 8, 8], "kernel": 4}, "odd"),
                        ({"kind": "conv", "in_shape": [1, 8, 8], "channels": [2, 2, 2, 2]}, "nothing"),
                        ({"kind": "conv", "in_shape": [1, 8, 8], "stride": 2}, "no option"),
                        ({"kind": "none", "channels": [2]}, "takes no options")]:
        with pytest.raises(ValueError, match=match):
            build_encoder(spec)
    with pytest.raises(ValueError, match="n_in=784 must be the encoder's input size 1×8×8 = 64"):
        FixedPointRNN(N=10, n_in=784, n_out=3, encoder=SPEC)


def test_the_conv_preset_trains_the_encoder_and_loads_back(tmp_path, mnist_dir):
    over = [*QUICK_MNIST, "experiment=conv_fashion", "data=mnist", "data.val_size=256",
            "model.encoder.channels=[4,8]", "model.layers=[40]", "data.batch_size=64"]
    cfg = make_cfg(over, tmp_path, mnist_dir)
    res = train(cfg)
    assert res["status"] == "finished" and res["test_acc"] > 0.3, res      # 12 steps; chance is 0.1
    net = FixedPointRNN.load(tmp_path)
    assert net.encoder is not None and net.encoder.in_shape == (1, 28, 28)
    fresh = FixedPointRNN(**{**net.config})
    moved = [n for n, t in net.named_parameters() if not torch.equal(t, dict(fresh.named_parameters())[n])]
    assert "encoder.net.0.weight" in moved and "layers.0.W" in moved
    p = torch.rand(5, 784)
    with torch.no_grad():
        assert torch.equal(FixedPointRNN.load(tmp_path)(p), net(p))


def test_an_encoder_on_data_without_images_says_so(tmp_path):
    with pytest.raises(ValueError, match="in_shape=auto needs image data"):
        train(make_cfg(["experiment=paper_linear", "+model.encoder={kind: conv, in_shape: auto}",
                        "logger=csv", "progress_bar=false"], tmp_path))
