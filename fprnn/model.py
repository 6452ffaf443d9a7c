"""FixedPointRNN: r = f(W r + x) with x = W_in p and a fixed read-out W_out (section 3.2)."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from . import solvers
from .activations import Activation, get_activation
from .dynamics import Dynamics, get_dynamics
from .solvers import Solution

Tensor = torch.Tensor

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def get_dtype(spec) -> torch.dtype:
    if isinstance(spec, torch.dtype) and spec in _DTYPES.values():
        return spec
    try:
        return _DTYPES[str(spec).replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {spec!r}; choose one of {sorted(_DTYPES)}") from None


@dataclass
class FixedPoint:
    r: Tensor            # (m, N) rates at the fixed point
    z: Tensor            # (m, N) pre-activations W r + x
    gain: Tensor         # (m, N) f'(z)
    x: Tensor            # (m, N) input
    solution: Solution   # solver stats; solution.u is the state (for a warm start)


def _solver_kwargs(name: str, kwargs: dict) -> dict:
    fn = solvers.SOLVERS.get(name)
    if fn is None:
        if name == "direct":
            if kwargs:
                raise ValueError(f"solver 'direct' takes no options, got {sorted(kwargs)}")
            return {}
        raise ValueError(f"unknown solver {name!r}; choose one of {solvers.ALL_SOLVERS}")
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("g", "u0")]
    bad = sorted(set(kwargs) - set(allowed))
    if bad:
        raise ValueError(f"solver {name!r} has no option(s) {bad}; its options are {allowed}")
    # the solver checks its option values first thing: run it on a 1×1 problem to fail now,
    # not in the middle of training
    fn(lambda u, rows=None: 0 * u, torch.zeros(1, 1), **kwargs)
    return dict(kwargs)


class FixedPointRNN(nn.Module):
    """A recurrent network trained on its fixed points.

    W (N×N) is initialised as σ_W Z/√N; the read-in W_in (N×n_in, Z/√n_in) and read-out
    W_out (n_out×N, Z/√N) are fixed random buffers, as in the paper. ``n_in=None`` feeds x
    directly (x = p, the linear task); ``n_out=None`` reads r itself out.
    """

    def __init__(self, N: int, n_in: int | None = None, n_out: int | None = None, *,
                 activation: str | Activation | Callable = "tanh", dynamics: str | Dynamics = "rate",
                 solver: str = "anderson", solver_kwargs: dict | None = None, sigma_W: float = 0.5,
                 seed: int = 0, dtype: Any = "float32", bptt_steps: int = 50, bptt_damping: float = 0.5):
        super().__init__()
        for name, v in (("N", N), ("n_in", n_in), ("n_out", n_out)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not (isinstance(sigma_W, (int, float)) and math.isfinite(sigma_W) and sigma_W >= 0):
            raise ValueError(f"sigma_W must be a non-negative finite number, got {sigma_W!r}")
        self.act = get_activation(activation)
        self.dyn = get_dynamics(dynamics)
        self.solver_name = solver
        self.solver_kwargs = _solver_kwargs(solver, dict(solver_kwargs or {}))
        if solver == "direct" and not self.act.is_identity:
            raise ValueError(f"solver 'direct' solves the linear model only; activation is "
                             f"{self.act.name!r}: use 'anderson', 'iterate' or 'euler'")
        self.bptt_steps, self.bptt_damping = int(bptt_steps), float(bptt_damping)
        self.N, self.n_in, self.n_out = N, n_in, n_out
        dt = get_dtype(dtype)
        gen = torch.Generator().manual_seed(int(seed))
        self.W = nn.Parameter(sigma_W * torch.randn(N, N, generator=gen, dtype=torch.float64).to(dt) / math.sqrt(N))
        W_in = torch.randn(N, n_in, generator=gen, dtype=torch.float64) / math.sqrt(n_in) if n_in else None
        W_out = torch.randn(n_out, N, generator=gen, dtype=torch.float64) / math.sqrt(N) if n_out else None
        self.register_buffer("W_in", None if W_in is None else W_in.to(dt))
        self.register_buffer("W_out", None if W_out is None else W_out.to(dt))
        # the constructor's arguments, so that a run can be rebuilt (FixedPointRNN.load); None when
        # the activation or dynamics is an object rather than a name
        named = isinstance(activation, str) and isinstance(dynamics, str)
        self.config = dict(N=N, n_in=n_in, n_out=n_out, activation=activation, dynamics=dynamics,
                           solver=solver, solver_kwargs=dict(self.solver_kwargs), sigma_W=sigma_W,
                           seed=seed, dtype=str(dt).replace("torch.", ""), bptt_steps=self.bptt_steps,
                           bptt_damping=self.bptt_damping) if named else None

    @classmethod
    def load(cls, run_dir, map_location="cpu") -> "FixedPointRNN":
        """The trained network of a finished run, from ``run_dir/model.json`` (the constructor's
        arguments) and ``run_dir/weights.pt``: ready to predict (``net(p)``) and to analyse
        (``fixed_point``, ``stability``)."""
        import json
        from pathlib import Path
        run_dir = Path(run_dir)
        for f in ("model.json", "weights.pt"):
            if not (run_dir / f).is_file():
                raise FileNotFoundError(f"{run_dir / f}: not found; FixedPointRNN.load needs a run "
                                        f"directory with model.json and weights.pt")
        net = cls(**json.loads((run_dir / "model.json").read_text()))
        weights = torch.load(run_dir / "weights.pt", map_location=map_location)
        wrong = net.shape_mismatch(weights)
        if wrong:
            raise ValueError(f"{run_dir}: weights.pt {wrong} (built from model.json)")
        with torch.no_grad():
            for name in net.WEIGHTS:
                if weights[name] is not None:
                    getattr(net, name).copy_(weights[name])
        return net

    WEIGHTS = ("W", "W_in", "W_out")

    def shape_mismatch(self, weights: dict) -> str | None:
        """How saved ``weights`` (name → tensor or None) fail to fit this network, or None."""
        for name in self.WEIGHTS:
            saved, mine = weights.get(name), getattr(self, name)
            if (saved is None) != (mine is None) or (saved is not None and saved.shape != mine.shape):
                return (f"has {name} of shape {None if saved is None else tuple(saved.shape)}, the model "
                        f"{None if mine is None else tuple(mine.shape)}")
        return None

    # -- maps ---------------------------------------------------------------------------
    def input(self, p: Tensor) -> Tensor:
        want = self.n_in or self.N
        if p.dim() != 2 or p.shape[1] != want:
            raise ValueError(f"input must be (m, {want}), got shape {tuple(p.shape)}")
        p = p.to(self.W.dtype)
        return p @ self.W_in.T if self.W_in is not None else p

    def readout(self, r: Tensor) -> Tensor:
        return r @ self.W_out.T if self.W_out is not None else r

    # -- fixed points -------------------------------------------------------------------
    def _solve(self, W: Tensor, x: Tensor, u0: Tensor | None) -> Solution:
        if self.solver_name == "direct":
            return solvers.direct(W, x)
        g = self.dyn.state_map(W, x, self.act)
        if u0 is None:
            u0 = torch.zeros_like(x)
        return solvers.SOLVERS[self.solver_name](g, u0, **self._solver_options())

    def _solver_options(self) -> dict:
        """The solver's options, with Euler's dt as this dynamics' step (1 for the discrete map)."""
        kw = dict(self.solver_kwargs)
        if self.solver_name == "euler":
            kw["dt"] = self.dyn.euler_dt(kw.get("dt", 0.01))
        return kw

    @torch.no_grad()
    def fixed_point(self, x: Tensor, u0: Tensor | None = None, W: Tensor | None = None) -> FixedPoint:
        """Solve r = f(W r + x) for a batch of inputs x (m, N) (already read in), starting from
        the state u0 (zeros by default; pass ``previous.solution.u`` for a warm start)."""
        W = self.W.detach() if W is None else W
        return self._at(W, x, self._solve(W, x, u0))

    def _at(self, W: Tensor, x: Tensor, sol: solvers.Solution) -> FixedPoint:
        r = self.dyn.rate(sol.u, self.act)
        z = r @ W.T + x
        return FixedPoint(r, z, self.act.df(z), x, sol)

    @torch.no_grad()
    def solved_fixed_point(self, x: Tensor) -> FixedPoint:
        """The fixed point solved to tolerance, for what only means something at a true fixed
        point (stability, eq 2.3). The model's own solver when it stops on a tolerance; under a
        fixed-step protocol (``euler`` with tol=None, the paper's forward pass, which stops short
        and, once W is unstable, nowhere near a fixed point) Anderson continues from where that
        protocol stopped — it converges to unstable fixed points too."""
        fp = self.fixed_point(x)
        if not (self.solver_name == "euler" and self.solver_kwargs.get("tol") is None):
            return fp
        W = self.W.detach()
        return self._at(W, x, solvers.anderson(self.dyn.state_map(W, x, self.act), fp.solution.u))

    def unrolled(self, x: Tensor) -> Tensor:
        """Rates with an autograd graph through the solver's iterations, for ``rule=bptt``.

        With ``solver=euler`` all ``steps`` Euler steps from 0 are unrolled (e.g. 500): the forward
        pass itself under the paper's protocol (``euler_paper``, no tolerance); with a tolerance
        the forward pass stops each sample early, the unrolled one does not. Otherwise the fixed
        point is solved without a graph and ``bptt_steps`` damped steps (``bptt_damping``) are
        unrolled from it (truncated BPTT)."""
        if self.solver_name == "euler":
            kw = self._solver_options()
            damping, steps = kw["dt"], int(kw.get("steps", 500))
            u = torch.zeros_like(x)
        else:
            u = self.fixed_point(x).solution.u
            steps, damping = self.bptt_steps, self.bptt_damping
        g = self.dyn.state_map(self.W, x, self.act)
        for _ in range(steps):
            u = u + damping * (g(u) - u)
        return self.dyn.rate(u, self.act)

    def forward(self, p: Tensor) -> Tensor:
        """Read-out of the fixed point for raw inputs p (no graph)."""
        return self.readout(self.fixed_point(self.input(p)).r)

    def stability(self, fp: FixedPoint) -> Tensor:
        """Per-sample stability value (max Re λ(G_i W) or ρ(G_i W)); stable iff < 1."""
        return self.dyn.stability(self.W.detach(), fp.gain)
