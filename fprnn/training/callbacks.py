"""Lightning callbacks: the diagnostics monitors (checkpoints: fprnn.training.checkpoint)."""
from __future__ import annotations

# Scalar names are fixed (dashboards and fprnn.analysis.figures rely on them): angle/theta12, ...,
# stability/max_re_eig, stability/frac_stable, stability/spectral_radius_W, solver/iters, ...

import math

import pytorch_lightning as pl
import torch

from fprnn.core import rules
from fprnn.analysis.fixed_points import analyse, probe_stability
from fprnn.core.implicit import resolve_rule_kwargs


def layer_key(name: str, l: int, L: int) -> str:
    """A per-layer metric's name: as it always was for one layer, ``name/ℓ`` in a stack."""
    return name if L == 1 else f"{name}/{l}"


def _every(trainer, k: int) -> bool:
    return k > 0 and trainer.global_step % k == 0


def _log(trainer, metrics: dict) -> None:
    """Straight to every attached logger at this step (Lightning's ``self.log`` would repeat a
    sparse value at every later step of the epoch)."""
    if trainer.is_global_zero:
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)


def _wandb_loggers(trainer):
    from pytorch_lightning.loggers import WandbLogger
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)] if trainer.is_global_zero else []


class SolverMonitor(pl.Callback):
    """Logs the fixed-point solver's work on each training batch, per layer: mean iterations,
    max residual, number of samples that did not reach the tolerance, and how many samples the
    solver left to the fallback (``solver/fallback``) with the fallback's steps on them."""

    def __init__(self, every_n_steps: int = 1):
        self.every = int(every_n_steps)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = getattr(pl_module, "last_step", None)
        if step is None or not _every(trainer, self.every):
            return
        logs, L = {}, len(step.fps)
        for l, fp in enumerate(step.fps):
            sol = fp.solution
            logs.update({layer_key("solver/iters", l, L): sol.iters_mean,
                         layer_key("solver/max_residual", l, L): sol.max_residual,
                         layer_key("solver/nonconverged", l, L): float(sol.n_nonconverged),
                         layer_key("solver/fallback", l, L): float(sol.fallback.sum()),
                         layer_key("solver/fallback_iters", l, L): float(sol.fallback_iters.sum())})
        _log(trainer, logs)


def update_peak(peak: dict, s: dict, step: int) -> dict:
    """Fold one probe's stability values ``s`` (from ``probe_stability``) into the worst seen."""
    # written as `not <=`, so that a NaN counts as the worst
    if not s["max_re_eig"] <= peak.get("peak_max_re_eig", -math.inf):
        peak.update(peak_max_re_eig=s["max_re_eig"], peak_step=step)
    if not s["frac_stable"] >= peak.get("min_frac_stable", math.inf):
        peak.update(min_frac_stable=s["frac_stable"], min_frac_stable_step=step)
    if "max_re_eig_W" in s and not s["max_re_eig_W"] <= peak.get("peak_max_re_eig_W", -math.inf):
        peak.update(peak_max_re_eig_W=s["max_re_eig_W"], peak_W_step=step)
    return peak


class _ProbeMonitor(pl.Callback):
    """Something measured every k steps (``_log``) on a fixed probe batch of training inputs."""

    def __init__(self, every_n_steps: int = 50, probe_size: int = 16):
        self.every, self.probe_size = int(every_n_steps), int(probe_size)
        self.probe = None

    def on_train_start(self, trainer, pl_module):
        self.probe = trainer.datamodule.probe_batch(self.probe_size)[0]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.probe is not None and _every(trainer, self.every):
            self._log(trainer, pl_module)

    def _log(self, trainer, pl_module):
        raise NotImplementedError


class StabilityMonitor(_ProbeMonitor):
    """Every k steps, on a fixed probe batch: per-sample max Re λ(G_i W) (ρ(G_i W) for discrete
    dynamics), its max, the fraction of stable fixed points, and eig(W). Every ``media_every``
    steps (and at the end) the eigenvalues of W go to W&B as a complex-plane scatter with the
    stability line Re λ = 1, and as a histogram of Re λ.

    ``peak`` keeps the worst values seen during training (largest max Re λ, smallest fraction
    stable, largest max Re λ(W), and their steps): an instability can be transient and gone by
    the end. It goes into results.json and is checkpointed with the run.

    Every ``multistable_every`` steps (continuous dynamics; 0: never) it also solves the probe
    by following the dynamics from rest and logs ``stability/multistable``, the fraction of probe
    inputs whose solver's fixed point is another than the one the dynamics reach
    (``FixedPointRNN.multistable``); ``peak`` keeps the largest as ``max_multistable``."""

    def __init__(self, every_n_steps: int = 50, probe_size: int = 16, media_every: int = 500,
                 multistable_every: int = 250):
        super().__init__(every_n_steps, probe_size)
        self.media_every, self.multistable_every = int(media_every), int(multistable_every)
        self.peak: dict[str, float] = {}

    def _log(self, trainer, pl_module):
        s = probe_stability(pl_module.model, self.probe)
        if _every(trainer, self.multistable_every) and all(l.dyn.continuous for l in pl_module.model.layers):
            s["multistable"] = float(pl_module.model.multistable(self.probe.to(pl_module.device)).float().mean())
            self.peak["max_multistable"] = max(self.peak.get("max_multistable", 0.0), s["multistable"])
        _log(trainer, {f"stability/{k}": v for k, v in s.items()})
        update_peak(self.peak, s, trainer.global_step)
        if _every(trainer, self.media_every):
            self.log_media(trainer, pl_module)

    def state_dict(self):
        return {"peak": dict(self.peak)}

    def load_state_dict(self, state):
        self.peak = dict(state.get("peak", {}))

    def on_train_end(self, trainer, pl_module):
        if self.probe is not None:
            self.log_media(trainer, pl_module)

    def log_media(self, trainer, pl_module):
        loggers = _wandb_loggers(trainer)
        if not loggers:
            return
        import matplotlib.pyplot as plt
        import wandb

        from fprnn.analysis.figures import eig_figure
        layers = pl_module.model.layers
        for l, layer in enumerate(layers):
            W = layer.W.detach().cpu()
            fig = eig_figure(W, continuous=layer.dyn.continuous)
            lam = torch.linalg.eigvals(W.double())
            for lg in loggers:
                L = len(layers)
                lg.experiment.log({layer_key("stability/eig_W", l, L): wandb.Image(fig),
                                   layer_key("stability/eig_W_real", l, L): wandb.Histogram(lam.real.numpy()),
                                   "trainer/global_step": trainer.global_step})
            plt.close(fig)


class AngleMonitor(pl.Callback):
    """Every k steps, on the step's own batch and the W it started from: the update of every
    rule, the angles between them in degrees (section 3.1.6) and their Frobenius norms; the angle
    between the update actually applied (after the optimizer, the mask and the constraints) and
    −∇L of the batch (``angle/applied_vs_gradient``: below 90° the step descends the batch loss to
    first order); and how unequal the training rule's per-sample steps are
    (``angle/step_norm_spread``, max / median of ‖ΔW_i‖, with ``step_norm_max``, ``_median``)."""

    def __init__(self, every_n_steps: int = 50, compare: tuple[str, ...] = ("w1", "w2", "w3", "w4")):
        self.every = int(every_n_steps)
        self.rules = tuple(compare)
        bad = [r for r in self.rules if r not in rules.RULES]
        if bad:
            raise ValueError(f"AngleMonitor: unknown rule(s) {bad}; choose from {sorted(rules.RULES)}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = getattr(pl_module, "last_step", None)
        if step is None or step.skipped:
            return
        if self.every <= 0 or not (_every(trainer, self.every) or trainer.global_step == 1):
            return      # every k steps and the first step; every_n_steps=0 turns the monitor off
        logs, L = {}, len(step.fps)
        for l, (layer, fp, W, delta) in enumerate(zip(pl_module.model.layers, step.fps, step.weights_before,
                                                      step.deltas)):
            if delta is None:       # bptt computes no δ below the last layer
                continue
            r, gain = fp.r[step.used], fp.gain[step.used]
            W = W if fp.size is None else layer.operator(W, fp.size)    # a conv W: the rules on its kernel
            dWs = {}
            for name in {*self.rules, "w1"}:
                # the training rule with its configured options; the others with their defaults
                kw = (pl_module.layer_kwargs[l] if name == pl_module.rule_name
                      else resolve_rule_kwargs(name, None, layer))
                dW, info = rules.RULES[name](W, r, gain, delta, pl_module.lr, return_info=True, **kw)
                if not info.get("out_of_domain") and torch.isfinite(dW).all():
                    dWs[name] = dW
            if "w1" in dWs:     # w1's ΔW is −η ∇L
                theta = rules.angle(layer.W.detach() - step.weights_before[l], dWs["w1"])
                if math.isfinite(theta):
                    logs[layer_key("angle/applied_vs_gradient", l, L)] = theta
            if pl_module.rule_name in rules.RULES:
                norms = rules.sample_step_norms(pl_module.rule_name, W, r, gain, delta, pl_module.lr)
                top, mid = float(norms.max()), float(norms.median())
                logs.update({layer_key("angle/step_norm_max", l, L): top,
                             layer_key("angle/step_norm_median", l, L): mid})
                if mid > 0:
                    logs[layer_key("angle/step_norm_spread", l, L)] = top / mid
            dWs = {k: v for k, v in dWs.items() if k in self.rules}
            logs.update({layer_key(f"angle/norm_{k}", l, L): float(torch.linalg.norm(v)) for k, v in dWs.items()})
            names = sorted(dWs)
            for i, a in enumerate(names):
                for b in names[i + 1:]:
                    theta = rules.angle(dWs[a], dWs[b])
                    if math.isfinite(theta):
                        logs[layer_key(f"angle/theta{a[1:]}{b[1:]}", l, L)] = theta
        _log(trainer, logs)


class AnalysisMonitor(_ProbeMonitor):
    """Every k steps, on the probe batch: [`fprnn.analysis.fixed_points.analyse`][fprnn.analysis.fixed_points.analyse] — the fractions of fixed
    points stable (with time constants), inhibition-stabilized and with a paradoxical response,
    the mean ISN index — logged as ``analysis/…``."""

    def _log(self, trainer, pl_module):
        _log(trainer, {f"analysis/{k}": v for k, v in analyse(pl_module.model, self.probe).items()})
