"""What a solve returns: per-sample states, costs and outcomes ([`Solution`][fprnn.core.solvers.solution.Solution],
[`Status`][fprnn.core.solvers.solution.Status]), and the book-keeping every solver shares ([`Tracker`][fprnn.core.solvers.solution.Tracker])."""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch

from fprnn.core.dynamics import StateMap

Tensor = torch.Tensor


class Status(IntEnum):
    """A sample's outcome (``Solution.status`` holds these codes): at a fixed point within tol; out
    of budget; at a fixed point the dynamics cannot reach (unstable, found by the fallback); not
    finite. The one vocabulary of a solve's outcome: the layers, the training step's fault policy
    and the reports all name a sample's fate by it."""
    SUCCESSFUL = 0
    MAX_STEPS = 1
    UNSTABLE = 2
    NONFINITE = 3

    @property
    def description(self) -> str:
        return STATUS_NAMES[self]


SUCCESSFUL, MAX_STEPS, UNSTABLE, NONFINITE = Status
#: how a report says each outcome
STATUS_NAMES = {SUCCESSFUL: "successful", MAX_STEPS: "did not settle within the budget",
                UNSTABLE: "unstable fixed point (max Re λ ≥ 1)", NONFINITE: "non-finite"}


@dataclass
class Solution:
    u: Tensor                # (m, N) the state at which each residual was measured
    iters: Tensor            # (m,) evaluations of g spent on each sample (fallback steps included)
    residual: Tensor         # (m,) ‖g(u) − u‖∞ per sample
    converged: Tensor        # (m,) bool: residual ≤ tol (always False for a fixed-step run without tol)
    tol: float | None = None
    solver: str = ""
    status: Tensor | None = None          # (m,) codes above; None: derived from converged and residual
    fallback: Tensor | None = None        # (m,) bool: handed to the dynamics by settle()
    fallback_iters: Tensor | None = None  # (m,) the fallback's steps on each sample

    def __post_init__(self):
        if self.status is None:
            self.status = torch.where(self.converged, SUCCESSFUL,
                                      torch.where(torch.isfinite(self.residual), MAX_STEPS, NONFINITE))
        if self.fallback is None:
            self.fallback = torch.zeros_like(self.converged)
            self.fallback_iters = torch.zeros_like(self.iters)

    def failures(self) -> str:
        """The unconverged samples by cause, e.g. "2 did not settle within the budget, 1 non-finite"."""
        counts = torch.bincount(self.status.flatten().long(), minlength=len(STATUS_NAMES)).tolist()
        return ", ".join(f"{n} {STATUS_NAMES[code]}" for code, n in enumerate(counts) if n and code != SUCCESSFUL)

    @property
    def max_residual(self) -> float:
        return float(self.residual.max()) if self.residual.numel() else 0.0

    @property
    def mean_residual(self) -> float:
        return float(self.residual.mean()) if self.residual.numel() else 0.0

    @property
    def iters_mean(self) -> float:
        return float(self.iters.float().mean()) if self.iters.numel() else 0.0

    @property
    def n_nonconverged(self) -> int:
        return int((~self.converged).sum())

    def stats(self) -> dict[str, float]:
        return {
            "iters": self.iters_mean,
            "iters_max": float(self.iters.max()) if self.iters.numel() else 0.0,
            "max_residual": self.max_residual,
            "mean_residual": self.mean_residual,
            "nonconverged": float(self.n_nonconverged),
            "fallback": float(self.fallback.sum()),
            "fallback_iters": float(self.fallback_iters.sum()),
        }


class Tracker:
    """Book-keeping shared by the solvers. The solver iterates a *working set* of samples
    (``rows``; None = all). A sample that finishes (residual ≤ tol, or not finite) has its state
    recorded and is marked dead; dead rows are dropped from the working set only once they make
    up ``compact_at`` of it, because compacting copies the solver's whole state."""

    def __init__(self, u0: Tensor, tol: float | None, compact_at: float = 0.25):
        if u0.dim() != 2:
            raise ValueError(f"u0 must be (m, N), got shape {tuple(u0.shape)}")
        m = u0.shape[0]
        self.tol, self.compact_at = tol, compact_at
        self.u = u0.clone()
        self.iters = torch.zeros(m, dtype=torch.long, device=u0.device)
        self.residual = torch.full((m,), math.inf, dtype=u0.dtype, device=u0.device)
        self.converged = torch.zeros(m, dtype=torch.bool, device=u0.device)
        self.rows: Tensor | None = None          # working set (indices into the batch)
        self.live = torch.ones(m, dtype=torch.bool, device=u0.device)  # over the working set
        self.done = m == 0
        self.stalled = torch.zeros(m, dtype=torch.bool, device=u0.device)

    def _orig(self, idx: Tensor) -> Tensor:
        return idx if self.rows is None else self.rows[idx]

    def _write(self, idx: Tensor, x: Tensor, res: Tensor, k: int) -> None:
        orig = self._orig(idx)
        self.u[orig] = x[idx]
        self.residual[orig] = res[idx]
        self.iters[orig] = k
        if self.tol is not None:
            self.converged[orig] = res[idx] <= self.tol

    def update(self, x: Tensor, res: Tensor, k: int, stalled: Tensor | None = None) -> Tensor | None:
        """Take the residuals ``res`` of the working set's states ``x`` after ``k`` evaluations
        (``stalled``: rows that leave unconverged, to be handed to another method).
        Returns a mask to compact the solver's state with, or None to keep it as it is."""
        finished = ~torch.isfinite(res)
        if self.tol is not None:
            finished |= res <= self.tol
        if stalled is not None:
            stalled = stalled & ~finished & self.live
            finished |= stalled
        finished &= self.live
        if not bool(finished.any()):
            return None
        self._write(finished.nonzero().squeeze(1), x, res, k)
        if stalled is not None and bool(stalled.any()):
            self.stalled[self._orig(stalled.nonzero().squeeze(1))] = True
        self.live &= ~finished
        n_live = int(self.live.sum())
        if n_live == 0:
            self.done = True
            return None
        if n_live > (1 - self.compact_at) * self.live.numel():
            return None
        keep = self.live
        self.rows = self._orig(keep.nonzero().squeeze(1))
        self.live = torch.ones(n_live, dtype=torch.bool, device=keep.device)
        return keep

    def finish(self, x: Tensor, res: Tensor, k: int) -> None:
        """The budget is spent: record the samples still running, unconverged."""
        if not self.done:
            self._write(self.live.nonzero().squeeze(1), x, res, k)
            self.done = True

    def solution(self, name: str) -> Solution:
        return Solution(self.u, self.iters, self.residual, self.converged, self.tol, name)


def residual(g: StateMap, x: Tensor, rows: Tensor | None) -> tuple[Tensor, Tensor]:
    """g(x) and each row's residual ‖g(x) − x‖∞: the one measure of settledness every solver stops on."""
    gx = g(x, rows)
    return gx, (gx - x).abs().amax(1)
