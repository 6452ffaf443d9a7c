"""The training layer: one step equals the core rule, resume is exact, outputs are complete."""
import json

import pytest
import torch
from hydra.errors import HydraException

from fprnn.core import rules
from stack_reference import loss_and_grad
from fprnn.training.run import build, train

from helpers import QUICK_MNIST, make_cfg

F64 = ["model.dtype=float64", "solver.kwargs.tol=1e-12"]


def first_batch_step(cfg, run_dir):
    """(W0, fixed point and δ of the first batch at W0, a function that runs the one training
    step and returns the change of W)."""
    data, model, module, trainer = build(cfg, run_dir)
    W0 = model.W.detach().clone()
    data.setup()
    p, y = data.train_set.tensors[0][:256].double(), data.train_set.tensors[1][:256]
    fp = model.fixed_point(model.input(p))
    _, delta, _ = loss_and_grad("classification", model, fp.r, y)

    def step():
        trainer.fit(module, datamodule=data)
        return model.W.detach() - W0

    return W0, fp, delta, step


@pytest.mark.parametrize("rule,dynamics", [("w1", "rate"), ("w2", "rate"), ("w3", "rate"), ("w4", "rate"),
                                           ("w3", "voltage"), ("w1", "voltage"),
                                           ("jfb", "rate")])
def test_one_module_step_equals_the_core_rule(tmp_path, mnist_dir, rule, dynamics):
    cfg = make_cfg([*QUICK_MNIST, *F64, f"rule={rule}", "lr=0.05", "data.shuffle=false",
                    f"model.dynamics={dynamics}", "trainer.max_steps=1", "trainer.limit_val_batches=0"],
                   tmp_path, mnist_dir)
    W0, fp, delta, step = first_batch_step(cfg, tmp_path)
    expected = rules.RULES[rule](W0, fp.r, fp.gain, delta, 0.05)
    got = step()
    assert float((got - expected).norm() / expected.norm()) < 1e-10


def test_bptt_step_is_autograd_through_the_unrolled_solver(tmp_path, mnist_dir):
    cfg = make_cfg([*QUICK_MNIST, *F64, "rule=bptt", "lr=0.1", "data.shuffle=false",
                    "trainer.max_steps=1", "trainer.limit_val_batches=0", "model.bptt_steps=300",
                    "model.bptt_damping=0.9"], tmp_path, mnist_dir)
    W0, fp, delta, step = first_batch_step(cfg, tmp_path)
    w1 = rules.w1(W0, fp.r, fp.gain, delta, 0.1)          # truncated BPTT → the exact gradient
    got = step()
    assert float((got - w1).norm() / w1.norm()) < 1e-6


def test_bptt_under_euler_is_autograd_through_the_euler_forward_pass(tmp_path, mnist_dir):
    """rule=bptt with solver=euler: the gradient flows through every Euler step from 0 (checked
    against a hand-written loop, so a W detached inside the unrolled pass fails here)."""
    cfg = make_cfg([*QUICK_MNIST, *F64, "rule=bptt", "lr=0.1", "data.shuffle=false", "solver=euler",
                    "solver.kwargs.steps=60", "solver.kwargs.dt=0.2", "solver.kwargs.tol=null",
                    "trainer.max_steps=1", "trainer.limit_val_batches=0"], tmp_path, mnist_dir)
    data, model, module, trainer = build(cfg, tmp_path)
    data.setup()
    p, y = data.train_set.tensors[0][:256].double(), data.train_set.tensors[1][:256]
    W = model.W.detach().clone().requires_grad_(True)
    x, r = model.input(p), torch.zeros(256, 300, dtype=torch.float64)
    for _ in range(60):
        r = r + 0.2 * (torch.tanh(r @ W.T + x) - r)
    loss = torch.nn.functional.cross_entropy(r @ model.W_out.T, y)
    expected = -0.1 * torch.autograd.grad(loss, W)[0]
    W0 = model.W.detach().clone()
    trainer.fit(module, datamodule=data)
    got = model.W.detach() - W0
    assert module.record.faults == 0 and float((got - expected).norm() / expected.norm()) < 1e-10


def test_checkpoint_resume_continues_to_the_identical_W(tmp_path, mnist_dir):
    common = [*QUICK_MNIST, *F64, "rule=w3", "lr=0.25"]
    full = train(make_cfg([*common, "trainer.max_epochs=3"], tmp_path / "full", mnist_dir))
    train(make_cfg([*common, "trainer.max_epochs=1"], tmp_path / "part", mnist_dir))
    ckpt = tmp_path / "part" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    resumed = train(make_cfg([*common, "trainer.max_epochs=3", f"ckpt_path={ckpt}"], tmp_path / "part", mnist_dir))
    Wf = torch.load(tmp_path / "full" / "weights.pt")["layers.0.W"]
    Wr = torch.load(tmp_path / "part" / "weights.pt")["layers.0.W"]
    assert resumed["steps"] == full["steps"] == 12
    assert torch.equal(Wf, Wr)


RESULT_KEYS = {"status", "rule", "lr", "task", "solver", "steps", "wall_s", "step_ms_median",
               "train_loss", "test_loss", "test_acc", "max_re_eig", "frac_stable", "max_re_eig_W",
               "spectral_radius_W", "solver_iters_mean", "solver_max_residual"}


def test_results_json_and_weights_for_mnist(tmp_path, mnist_dir):
    cfg = make_cfg([*QUICK_MNIST, "rule=w3", "lr=0.25"], tmp_path, mnist_dir)
    train(cfg)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert RESULT_KEYS <= set(saved)
    assert saved["status"] == "finished" and saved["task"] == "classification" and saved["steps"] == 4
    assert saved["frac_stable"] == 1.0 and saved["max_re_eig"] < 1
    assert saved["solver_max_residual"] <= 1e-5
    w = torch.load(tmp_path / "weights.pt")
    assert w["layers.0.W"].shape == (300, 300) and w["layers.0.V"].shape == (300, 784) and w["W_out"].shape == (10, 300)
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "csv" / "metrics.csv").read_text().count("\n") > 4
    # test_acc against the saved weights, evaluated independently on the same 500 test images
    data, model, *_ = build(cfg, tmp_path / "again")
    data.setup()
    model.load_state_dict(w)
    x, y = data.test_set.tensors
    acc = float((model(x).argmax(1) == y).double().mean())
    assert saved["test_acc"] == pytest.approx(acc, abs=1e-6) and acc > 0.3   # 4 steps; chance is 0.1


def test_linear_task_learns_and_reports_loss_W(tmp_path):
    cfg = make_cfg(["experiment=paper_linear", "progress_bar=false", "logger=csv", "rule=w3", "lr=1",
                    "trainer.max_steps=200"], tmp_path)
    res = train(cfg)
    data, *_ = build(cfg, tmp_path / "again")
    W = torch.load(tmp_path / "weights.pt")["layers.0.W"]
    assert res["loss_W"] == pytest.approx(data.loss(W), rel=1e-12)
    W0 = build(cfg, tmp_path / "again")[1].W.detach()
    assert res["loss_W"] < 0.05 * data.loss(W0)
    assert res["loss_W_star"] < 1e-20 and res["task"] == "regression" and "test_acc" in res


def test_bad_config_values_give_clear_errors(tmp_path, mnist_dir):
    with pytest.raises(HydraException, match=r"(?s)rule/w9.*w1.*w2.*w3"):
        make_cfg(["rule=w9"])
    with pytest.raises(HydraException, match=r"(?s)solver/newton.*anderson.*euler_paper"):
        make_cfg(["solver=newton"])
    with pytest.raises(ValueError, match="lr must be a positive finite number, got -1"):
        train(make_cfg([*QUICK_MNIST, "lr=-1"], tmp_path / "a", mnist_dir))
    with pytest.raises(ValueError, match="model.n_in=100 does not match the data's input size 784"):
        train(make_cfg([*QUICK_MNIST, "model.n_in=100"], tmp_path / "b", mnist_dir))
    with pytest.raises(ValueError, match="unknown activation 'tanhh'"):
        train(make_cfg([*QUICK_MNIST, "model.activation=tanhh"], tmp_path / "c", mnist_dir))
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        train(make_cfg([*QUICK_MNIST, "data.batch_size=0"], tmp_path / "d", mnist_dir))
    saved = json.loads((tmp_path / "d" / "results.json").read_text())
    assert saved["status"] == "failed" and "batch_size" in saved["error"]


def test_a_finished_run_loads_back_in_one_call(tmp_path, mnist_dir):
    from fprnn.models.dense import FixedPointRNN
    cfg = make_cfg([*QUICK_MNIST, "rule=w3", "lr=0.25", "model.layers=[64]", "model.activation=softplus"],
                   tmp_path, mnist_dir)
    res = train(cfg)
    net = FixedPointRNN.load(tmp_path)
    assert (net.N, net.n_in, net.n_out, net.act.name) == (64, 784, 10, "softplus")
    assert torch.equal(net.W.detach(), torch.load(tmp_path / "weights.pt")["layers.0.W"])
    data, *_ = build(cfg, tmp_path / "again")
    data.setup()
    x, y = data.test_set.tensors
    assert float((net(x).argmax(1) == y).double().mean()) == pytest.approx(res["test_acc"], abs=1e-6)
    assert bool((net.stability(net.fixed_point(net.input(x[:8]))) < 1).all())
    (tmp_path / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.json: not found"):
        FixedPointRNN.load(tmp_path)
