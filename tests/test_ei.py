"""Excitatory/inhibitory networks: constraints that hold under every rule, the supralinear unit,
time constants, the analysis at the fixed point, step control and fitting recorded responses —
each against an independent reference (autograd, finite differences, closed forms)."""
import math
from functools import partial

import pytest
import pytorch_lightning as pl
import torch

from fprnn.analysis import fixed_points

from fprnn.core import constraints, rules
from fprnn.core.activations import get_activation
from fprnn.data.datamodules import ResponsesDataModule
from fprnn.models.dense import FixedPointRNN
from fprnn.training.module import FixedPointModule
from fprnn.training.objectives import Static
from fprnn.data.ssn import preferred_orientations, ssn, stimuli, teacher_responses
from stack_reference import loss_and_grad, rule_step

F64 = torch.float64


def small_ssn(seed=0, **kw):
    """A 20-unit SSN (16 E, 4 I, half the connections) and 12 stimuli it converges on."""
    kw.setdefault("blocks", ((1.0, 1.0), (1.2, 0.8)))
    net = ssn(20, seed=seed, p_connect=0.5, **kw)
    X = stimuli(preferred_orientations(net.layers[0].sign), torch.arange(4, dtype=F64) * math.pi / 4,
                [3.0, 8.0, 15.0])
    return net, X


def responses(net, X, units):
    R = net.fixed_points(X)[0].r[:, units]
    return {"X": X, "R": R * 1.3 + 0.5, "units": units}     # a target the network does not produce


def fit(module, data, steps, callbacks=()):
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, datamodule=data)
    return trainer


class Watch(pl.Callback):
    """After every step: the constraint violations of the applied W and of the unconstrained
    proposal W_before + ΔW (SGD with lr 1), to show the constraint had something to do."""

    def __init__(self):
        self.applied, self.proposed = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        layer, step = pl_module.model.layers[0], pl_module.last_step
        self.applied.append(constraints.violations(layer.W.detach(), layer.sign, layer.mask))
        if not step.skipped:
            proposal = step.weights_before[0] - layer.W.grad      # SGD with lr 1, before constraints
            self.proposed.append(constraints.violations(proposal, layer.sign, None))


@pytest.mark.parametrize("method", ["project", "reparam"])
@pytest.mark.parametrize("rule", ["w1", "w2", "w3", "w4", "bptt"])
def test_signs_and_mask_hold_after_every_step_of_every_rule(rule, method):
    net, X = small_ssn(constraint=method)
    units = torch.tensor([0, 3, 9, 16, 19])
    # a step a tenth of W's size: unconstrained, it crosses zero at some small entries
    probe = rule_step(net, X, responses(net, X, units)["R"], "regression", rules.RULES["w1" if rule == "bptt" else rule],
                      1.0, [{}], units=units)
    assert probe.fault is None, probe.fault
    lr = 0.1 * float(net.layers[0].W.detach().norm() / probe.grads["layers.0.W"].norm())
    if rule == "w2":     # the exact rule's domain: 1 − ηκ > 0
        lr = min(lr, 0.5 / float(analysis_kappa(net, X, units)))
    data = ResponsesDataModule(arrays=responses(net, X, units), direct=True, batch_size=9, val_size=0,
                               test_size=0.25, shuffle=False)
    module = FixedPointModule(net, Static("regression", units), rule=rule, lr=lr,
                              optimizer=partial(torch.optim.SGD, lr=1.0))
    W0 = net.layers[0].W.detach().clone()
    watch = Watch()
    fit(module, data, 4, [watch])
    layer = net.layers[0]
    assert module.record.faults == 0 and watch.applied == [0, 0, 0, 0], (module.record.fault_log, watch.applied)
    assert sum(watch.proposed) > 0, watch.proposed
    assert not torch.equal(layer.W.detach(), W0)
    assert bool((layer.W.detach()[~layer.mask] == 0).all())
    if method == "project":
        assert module.record.clipped > 0


def analysis_kappa(net, X, units):
    """max_i κ_i of w2 at lr 1 (its step divides by 1 − η κ_i)."""
    fp = net.fixed_points(X)[0]
    _, delta, _ = loss_and_grad("regression", net, fp.r, responses(net, X, units)["R"], units)
    W = net.layers[0].W.detach()
    A, _, C = rules.factors(W, fp.r, fp.gain, delta)
    return (C * fp.gain * A).sum(1).abs().max()


def test_without_constraints_the_maps_are_the_identity_and_feasible_steps_pass():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, generator=g, dtype=F64)
    W_new = W + 0.1 * torch.randn(6, 6, generator=g, dtype=F64)
    for method in constraints.METHODS:
        out, n = constraints.constrain(W, W_new, None, None, method)
        assert torch.equal(out, W_new) and n == 0
    sign = torch.tensor([1.0, 1, 1, 1, -1, -1], dtype=F64)
    W = W.abs() * sign
    step = 1e-4 * torch.randn(6, 6, generator=g, dtype=F64)
    feasible = W + step                                     # small enough to keep every sign
    assert constraints.violations(feasible, sign, None) == 0
    out, n = constraints.constrain(W, feasible, sign, None, "project")
    assert torch.equal(out, feasible) and n == 0
    out, n = constraints.constrain(W, feasible, sign, None, "reparam")
    # W ⊙ exp(ΔW ⊘ W) − (W + ΔW) = W (eˣ − 1 − x), x = ΔW/W, and |eˣ − 1 − x| ≤ x² for |x| ≤ 1
    assert n == 0 and bool(((out - feasible).abs() <= step ** 2 / W.abs() + 1e-18).all())
    # a proposal that crosses zero: projection clips to 0, the reparameterization shrinks
    crossing = W - 2 * W * (torch.arange(36).reshape(6, 6) % 5 == 0)
    for method in constraints.METHODS:
        out, n = constraints.constrain(W, crossing, sign, None, method)
        assert constraints.violations(out, sign, None) == 0 and n == 8


@pytest.mark.parametrize("spec", [{"name": "powerlaw", "k": 0.04, "n": 2.0},
                                  {"name": "powerlaw", "k": 0.3, "n": 3.0, "r_max": 50.0},
                                  {"name": "powerlaw", "k": 0.04, "n": 2.0, "r_max": 20.0, "cap": "hard"}])
def test_powerlaw_derivative_is_exact(spec):
    act = get_activation(spec)
    z = torch.linspace(-5, 40, 301, dtype=F64).requires_grad_(True)
    (auto,) = torch.autograd.grad(act.f(z).sum(), z)
    assert torch.allclose(act.df(z.detach()), auto, rtol=1e-12, atol=1e-12)
    r = act.f(z.detach())
    assert float(r.min()) == 0 and (spec.get("r_max") is None or float(r.max()) <= spec["r_max"])


def test_bad_powerlaw_and_ei_arguments():
    with pytest.raises(ValueError, match="powerlaw n must be a finite number ≥ 1"):
        get_activation({"name": "powerlaw", "n": 0.5})
    with pytest.raises(ValueError, match="n_exc must be a fraction in \\(0, 1\\] or a count 1..10"):
        FixedPointRNN(10, n_exc=1.5)
    with pytest.raises(ValueError, match="p_connect must be a probability in \\(0, 1\\], got 0"):
        FixedPointRNN(10, n_exc=0.8, p_connect=0)
    with pytest.raises(ValueError, match="tau_I is the inhibitory units' time constant: set n_exc too"):
        FixedPointRNN(10, tau_I=5.0)
    with pytest.raises(ValueError, match="unknown constraint 'clip'"):
        FixedPointRNN(10, n_exc=0.8, constraint="clip")


@pytest.mark.parametrize("dynamics", ["rate", "voltage"])
def test_stability_with_time_constants_is_the_jacobians_eigenvalues(dynamics):
    """The ODE's right-hand side F, differentiated by autograd at the fixed point, its
    eigenvalues against the stability value s = 1 + τ_min max Re λ(J)."""
    net, X = small_ssn(dynamics=dynamics)
    layer = net.layers[0]
    fp = net.fixed_points(X[:5], solved=True)[0]
    W, tau, act = layer.W.detach(), layer.tau, layer.act
    assert float(tau.max()) == 20 and float(tau.min()) == 10
    for i in range(5):
        x = fp.x[i]
        if dynamics == "rate":
            u, F = fp.r[i], lambda r: (-r + act.f(W @ r + x)) / tau
        else:
            u, F = fp.z[i], lambda v: (-v + W @ act.f(v) + x) / tau
        J = torch.autograd.functional.jacobian(F, u)
        want = 1 + 10 * torch.linalg.eigvals(J).real.max()
        assert float(layer.stability(fp)[i]) == pytest.approx(float(want), rel=1e-10, abs=1e-12)
    # with τ the two forms differ; with equal τ both are max Re λ(G W)
    same = ssn(20, p_connect=0.5, tau=5.0, tau_I=None, n_exc=0.8).layers[0]
    g = fp.gain
    assert torch.allclose(same.dyn.stability(W, g, same.tau), same.dyn.stability(W, g), rtol=1e-10, atol=1e-12)


def test_predicted_response_matches_finite_differences_of_resolved_fixed_points():
    net, X = small_ssn()
    layer = net.layers[0]
    fp = net.fixed_points(X)[0]
    dx = torch.zeros(20, dtype=F64)
    dx[layer.sign < 0] = 1.0                                  # extra drive to every inhibitory unit
    pred = fixed_points.linear_response(layer.W.detach(), fp.gain, dx)
    eps = 1e-4
    up, down = net.fixed_points(X + eps * dx)[0].r, net.fixed_points(X - eps * dx)[0].r
    fd = (up - down) / (2 * eps)
    assert float((pred - fd).norm() / fd.norm()) < 1e-6


@pytest.mark.parametrize("w_EE,isn", [(0.5, False), (2.0, True)])
def test_isn_index_and_paradoxical_response_of_two_units(w_EE, isn):
    """E and I units, W = [[w_EE, −w_EI], [w_IE, −w_II]], gains g: the excitatory subnetwork's
    index is g_E w_EE; the I unit's response to its own input is g_I (1 − g_E w_EE) / det(I − G W),
    paradoxical (< 0) exactly when the stable network is an ISN."""
    w_EI, w_IE, w_II = 3.0, 1.5, 1.5
    W = torch.tensor([[w_EE, -w_EI], [w_IE, -w_II]], dtype=F64)
    gain = torch.tensor([[1.2, 0.8]], dtype=F64)
    sign = torch.tensor([1.0, -1.0], dtype=F64)
    gE, gI = 1.2, 0.8
    assert float(fixed_points.isn_index(W, gain, sign)) == pytest.approx(gE * w_EE, rel=1e-12)
    det = (1 - gE * w_EE) * (1 + gI * w_II) + gE * w_EI * gI * w_IE
    assert det > 0 and gE * w_EE - gI * w_II < 2                 # stable: det(I − GW) > 0, tr(−I + GW) < 0
    assert float(torch.linalg.eigvals(gain[0, :, None] * W).real.max()) < 1
    resp, para = fixed_points.paradoxical(W, gain, sign)
    assert float(resp) == pytest.approx(gI * (1 - gE * w_EE) / det, rel=1e-12)
    assert bool(para) is isn and (gE * w_EE > 1) is isn


def linear_net_and_data(seed=0):
    net = FixedPointRNN(10, activation="identity", dtype="float64", sigma_W=0.3, seed=seed, solver="iterate",
                        solver_kwargs={"tol": 1e-8, "max_iter": 5000})
    g = torch.Generator().manual_seed(seed + 5)
    X = torch.randn(8, 10, generator=g, dtype=F64)
    units = torch.arange(10)
    return net, {"X": X, "R": 3 * torch.randn(8, 10, generator=g, dtype=F64), "units": units}


@pytest.mark.parametrize("backtrack", [0, 8])
def test_step_control_halves_a_step_that_breaks_convergence(backtrack):
    """lr so large that W + ΔW has ρ > 1 (the iteration diverges): with step control the step is
    halved until the fixed points converge and are stable, and the run goes on; without, the run
    faults at the next step and stays where it broke."""
    net, arrays = linear_net_and_data()
    units = arrays["units"]
    W0 = net.layers[0].W.detach().clone()
    unit = rule_step(net, arrays["X"], arrays["R"], "regression", rules.w3, 1.0, [{}], units=units).grads["layers.0.W"]
    lr = 4.0 / float(unit.norm())
    assert float(torch.linalg.eigvals(W0 - lr * unit).abs().max()) > 1     # the full step breaks it
    data = ResponsesDataModule(arrays=arrays, direct=True, batch_size=6, val_size=0, test_size=0.25, shuffle=False)
    module = FixedPointModule(net, Static("regression", units), rule="w3", lr=lr, backtrack=backtrack,
                              optimizer=partial(torch.optim.SGD, lr=1.0))
    fit(module, data, 3)
    W = net.layers[0].W.detach()
    if backtrack:
        assert module.record.faults == 0 and module.record.backtracks > 0 and module.record.status == "running"
        assert float(torch.linalg.eigvals(W).real.max()) < 1 and not torch.equal(W, W0)
        assert net.fixed_points(arrays["X"])[0].solution.n_nonconverged == 0
    else:
        first = module.record.fault_log[0]
        assert module.record.status == "diverged" and ("not converged" in first or "non-finite" in first), first


def test_responses_loss_is_on_the_recorded_units_only():
    net, X = small_ssn()
    units = torch.tensor([1, 4, 18])
    arrays = responses(net, X, units)
    fp = net.fixed_points(X)[0]
    losses, delta, out = loss_and_grad("regression", net, fp.r, arrays["R"], units)
    err = fp.r[:, units] - arrays["R"]
    assert torch.allclose(losses, (err ** 2).sum(1)) and torch.equal(out, fp.r[:, units])
    others = torch.ones(20, dtype=torch.bool)
    others[units] = False
    assert bool((delta[:, others] == 0).all()) and torch.allclose(delta[:, units], 2 * err)


def test_responses_file_errors_name_the_problem(tmp_path):
    import numpy as np
    bad = tmp_path / "r.npz"
    np.savez(bad, X=np.zeros((5, 3)), R=np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"missing \['units'\]"):
        ResponsesDataModule(path=str(bad))
    np.savez(bad, X=np.zeros((5, 3)), R=np.zeros((5, 2)), units=np.array([1, 1]))
    with pytest.raises(ValueError, match="units must be 2 distinct non-negative integer indices"):
        ResponsesDataModule(path=str(bad))
    np.savez(bad, X=np.zeros((5, 3)), R=np.zeros((4, 2)), units=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"R must be \(5, k\) like X's rows"):
        ResponsesDataModule(path=str(bad))


def test_ssn_teacher_converges_is_stable_and_inhibition_stabilized_at_high_contrast():
    arrays, teacher = teacher_responses()
    assert arrays["X"].shape == (72, 200) and arrays["R"].shape == (72, 50) and arrays["R_test"].shape == (72, 50)
    layer = teacher.layers[0]
    assert constraints.violations(layer.W, layer.sign, layer.mask) == 0
    low, high = fixed_points.analyse(teacher, arrays["X"][:12]), fixed_points.analyse(teacher, arrays["X"][-12:])
    assert low["frac_stable"] == high["frac_stable"] == 1.0
    assert low["frac_isn"] == 0 and high["frac_isn"] > 0.5 and high["frac_paradoxical"] > 0.5


def test_ssn_fit_preset_keeps_the_constraints_and_draws_fitted_against_recorded(tmp_path):
    from fprnn.analysis.figures import make_figures
    from fprnn.training.run import train

    from helpers import make_cfg
    res = train(make_cfg(["experiment=ssn_fit", "trainer.max_epochs=5", "progress_bar=false", "logger=csv"],
                         tmp_path))
    assert res["status"] == "finished" and res["steps"] == 5 and -10 < res["test_r2"] < 1
    assert res["analysis"]["frac_stable"] == 1.0 and 0 <= res["teacher_analysis"]["frac_isn"] <= 1
    net = FixedPointRNN.load(tmp_path)
    layer, teacher = net.layers[0], teacher_responses()[1].layers[0]
    assert constraints.violations(layer.W, layer.sign, layer.mask) == 0 and res["clipped"] > 0
    assert torch.equal(layer.mask, teacher.mask) and not torch.equal(layer.W, teacher.W)
    names = {p.name for p in make_figures(tmp_path)}
    assert {"responses.png", "val_r2.png"} <= names


def test_stable_init_scales_w_until_the_fixed_points_converge_and_are_stable():
    """An E/I network with strong excitation and no rate bound runs away for strong inputs;
    scale_to_stable shrinks W (by 0.8 at a time) until all converge below the target."""
    net, X = small_ssn(blocks=((3.0, 1.0), (1.2, 0.8)), activation={"name": "powerlaw", "k": 0.04, "n": 2.0})
    before = net.fixed_points(X, solved=True)[0]
    assert before.solution.n_nonconverged > 0 or float(net.layers[0].stability(before).max()) >= 0.9
    W0 = net.layers[0].W.detach().clone()
    scale = net.scale_to_stable(X, 0.9)
    after = net.fixed_points(X, solved=True)[0]
    assert scale < 1 and torch.allclose(net.layers[0].W, scale * W0)
    assert after.solution.n_nonconverged == 0 and float(net.layers[0].stability(after).max()) < 0.9
