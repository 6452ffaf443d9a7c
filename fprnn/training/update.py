"""What a training step needs beside autograd: the per-sample loss (torch's own), the checks that
keep faults from the weights, the record of the step that the monitors read and the run's record
(faults, status, timings) that its checkpoints keep.

The step itself is forward → loss → backward ([`fprnn.training.module.FixedPointModule`][fprnn.training.module.FixedPointModule]): every
layer's fixed point is the output of [`fprnn.core.implicit`][fprnn.core.implicit]'s Function, whose backward gives each
W its rule's −ΔW and everything else its gradient.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from fprnn.core.implicit import all_finite
from fprnn.models.dense import FixedPoint, FixedPointRNN

Tensor = torch.Tensor


def per_sample_loss(task: str, out: Tensor, y: Tensor) -> Tensor:
    """L_i of each prediction: cross-entropy of softmax(ŷ) (classification; for maps of classes,
    (m, classes, H, W), its mean over the pixels) or ‖ŷ − y‖²."""
    if task == "classification":
        loss = F.cross_entropy(out, y, reduction="none")
        return loss.flatten(1).mean(1) if loss.dim() > 1 else loss
    return F.mse_loss(out, y, reduction="none").sum(1)


def solution_fault(fps: list[FixedPoint], max_nonconverged: float | None) -> str | None:
    """The first fault of a batch's fixed points: non-finite values, or more than
    ``max_nonconverged`` of the batch missing the tolerance in some layer (fewer are left out of
    the step), or no sample converged in every layer. ``max_nonconverged=None``: unsettled
    samples are trained on (bptt through the iteration), and only non-finite values are a fault."""
    used = None
    for l, fp in enumerate(fps):
        sol, where = fp.solution, f" in layer {l}" if len(fps) > 1 else ""
        if not (all_finite(fp.r) and all_finite(sol.residual)):
            return f"non-finite fixed point{where}"
        if sol.tol is not None and max_nonconverged is not None:
            if sol.n_nonconverged > max_nonconverged * len(fp.r):
                return (f"fixed point not converged{where} for {sol.n_nonconverged}/{len(fp.r)} "
                        f"samples: {sol.failures()} (max residual {sol.max_residual:.3g})")
            used = sol.converged if used is None else used & sol.converged
    if used is not None and not bool(used.any()):
        return "no sample converged"
    return None


@torch.no_grad()
def unfit(model: FixedPointRNN, p: Tensor, max_nonconverged: float = 0.0, probe: int = 16) -> str | None:
    """Why the network's current weights are unfit for inputs p — fixed points that do not
    converge ([`solution_fault`][fprnn.training.update.solution_fault]) or an unstable one among the first ``probe`` — or None.
    Step control asks this after a step."""
    if not all_finite(p):
        return "non-finite input"
    fps = model.fixed_points(p)
    fault = solution_fault(fps, max_nonconverged)
    if fault is not None:
        return fault
    worst = max(float(layer.dyn.stability(layer.W.detach(), fp.gain[:probe], layer.tau).max())
                for layer, fp in zip(model.layers, fps))
    return None if worst < 1 else f"an unstable fixed point (stability {worst:.3g})"


def backtrack(model: FixedPointRNN, p: Tensor, apply: Callable[[], None], halvings: int,
              max_nonconverged: float) -> tuple[str | None, int]:
    """Step control: ``apply()`` the step, then solve the batch at the new weights; while its fixed
    points do not converge or a probed one (the first 16) is unstable ([`unfit`][fprnn.training.update.unfit]), halve the
    step, up to ``halvings`` times. A step that no halving rescues is undone and its fault returned,
    with the number of halvings made. The optimizer's state (momentum, Adam's moments) keeps the
    full step's update."""
    params = list(model.parameters())
    before = [t.detach().clone() for t in params]
    apply()
    p = p.to(model.dtype)
    for k in range(halvings + 1):
        why = unfit(model, p, max_nonconverged)
        if why is None:
            return None, k
        if k < halvings:
            with torch.no_grad():
                for t, b in zip(params, before):
                    t.copy_(b + 0.5 * (t - b))
    with torch.no_grad():
        for t, b in zip(params, before):
            t.copy_(b)
    return f"step undone after {halvings} halvings: {why}", halvings


@dataclass
class Step:
    """One training step, for the monitors: every layer's fixed point, the per-sample losses and
    predictions, the samples used (converged in every layer), those in the loss (``trained``: the
    used ones, or all with ``unsettled="train"``), each layer's per-sample errors
    δ_ℓ = ∂L_i/∂r_ℓ on those samples (None where autograd computed none: bptt below the top), the
    W's the step started from, its fault, and the MB autograd saved for its backward (where measured)."""
    fps: list[FixedPoint]
    losses: Tensor
    logits: Tensor
    used: Tensor
    weights_before: list[Tensor]
    deltas: list[Tensor | None] = field(default_factory=list)
    fault: str | None = None
    skipped: bool = False
    trained: Tensor | None = None
    graph_mb: float | None = None

    def __post_init__(self):
        if self.trained is None:
            self.trained = self.used

    @property
    def n_used(self) -> int:
        return int(self.used.sum())


@dataclass
class RunRecord:
    """What a run has done so far, kept in its checkpoints so that a resumed run reports the whole
    run. A fault skips its step, so ``faults`` counts skipped steps; ``clipped`` counts entries the
    constraints set back, ``backtracks`` halvings of a step, ``fallback_*`` the samples handed to
    the solver's fallback and its steps, ``unconverged`` the samples of a step that did not settle
    (left out of it, or trained on with ``unsettled="train"``)."""
    status: str = "running"
    faults: int = 0
    consecutive_faults: int = 0
    fault_log: list[str] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    iters_sum: float = 0.0
    fallback_samples: int = 0
    fallback_iters: int = 0
    clipped: int = 0
    backtracks: int = 0
    unconverged: int = 0

    def fault(self, what: str, stop: bool, max_faults: int) -> bool:
        """Record a skipped step; True when the run ends here as "diverged": at the first fault
        (``stop``) or the ``max_faults``-th in a row."""
        self.faults += 1
        self.consecutive_faults += 1
        self.fault_log.append(what)
        if stop or self.consecutive_faults >= max_faults:
            self.status = "diverged"
        return self.status == "diverged"

    def count_step(self, ms: float, step: Step) -> None:
        """An attempted step (applied or skipped): its time and its solvers' work."""
        if not step.skipped:
            self.consecutive_faults = 0
        self.step_ms.append(ms)
        self.unconverged += len(step.used) - step.n_used
        self.iters_sum += sum(fp.solution.iters_mean for fp in step.fps)
        self.fallback_samples += sum(int(fp.solution.fallback.sum()) for fp in step.fps)
        self.fallback_iters += sum(int(fp.solution.fallback_iters.sum()) for fp in step.fps)

    def close(self, max_skipped: float) -> None:
        """A run that skipped more than ``max_skipped`` of its steps has not trained: "no_progress"."""
        attempted = len(self.step_ms)
        if self.status == "running" and attempted and self.faults > max_skipped * attempted:
            self.status = "no_progress"

    def summary(self) -> dict:
        n = max(len(self.step_ms), 1)
        return {"step_ms_median": statistics.median(self.step_ms) if self.step_ms else None,
                "solver_iters_mean": self.iters_sum / n, "solver_fallback": self.fallback_samples,
                "solver_fallback_iters": self.fallback_iters, "faults": self.faults,
                "clipped": self.clipped, "backtracks": self.backtracks, "unconverged": self.unconverged,
                "attempted_steps": len(self.step_ms), "fault_log": self.fault_log[-20:]}
