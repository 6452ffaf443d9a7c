"""Batched fixed-point solvers with per-sample stopping, one module a family:
[`solution`][fprnn.core.solvers.solution] (what a solve returns), [`iteration`][fprnn.core.solvers.iteration]
(iteration, Euler, Anderson), [`following`][fprnn.core.solvers.following] (the dynamics followed: ptc, rk23; the
fallback), [`linear`][fprnn.core.solvers.linear] (the linear network). Each is re-exported here.

Every solver takes a map ``g(u, rows)`` (see [`fprnn.core.dynamics`][fprnn.core.dynamics]) and a start ``u0`` (m, N),
and returns a [`Solution`][fprnn.core.solvers.solution.Solution]: the states and per-sample stats. The residual of
sample i is ‖g(u_i) − u_i‖∞ at the returned u_i (for rate dynamics: ‖f(W r + x) − r‖∞). A sample
stops costing compute once its residual is ≤ ``tol``; a sample that does not get there within the
budget, or whose state stops being finite, is reported in ``converged`` and ``status`` — never
hidden.
"""
from __future__ import annotations

from typing import Callable

from fprnn.core.solvers.following import (DEFAULT_FALLBACK, FALLBACKS, MATRIX_FREE_DEFAULT_FALLBACK, check_fallback,
                                       follow, follow_euler, follow_rk23, how_to_follow, jacobian, ptc,
                                       resolve_fallback, settle)
from fprnn.core.solvers.iteration import anderson, euler, iterate
from fprnn.core.solvers.linear import direct
from fprnn.core.solvers.solution import (MAX_STEPS, NONFINITE, STATUS_NAMES, SUCCESSFUL, UNSTABLE, Solution, Status,
                                         Tracker, residual)

__all__ = ["ALL_SOLVERS", "DEFAULT_FALLBACK", "FALLBACKS", "MATRIX_FREE_DEFAULT_FALLBACK", "MAX_STEPS", "NONFINITE",
           "SOLVERS", "STATUS_NAMES", "SUCCESSFUL", "UNSTABLE", "Solution", "Status", "Tracker", "anderson",
           "check_fallback", "direct", "euler", "follow", "follow_euler", "follow_rk23", "how_to_follow", "iterate",
           "jacobian", "ptc", "residual", "resolve_fallback", "settle"]

#: Solvers that work on any map g(u, rows); ``direct`` needs the linear model (see model.py).
SOLVERS: dict[str, Callable[..., Solution]] = {"anderson": anderson, "iterate": iterate, "euler": euler}
ALL_SOLVERS = sorted([*SOLVERS, "direct"])
