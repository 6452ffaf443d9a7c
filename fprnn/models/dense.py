"""FixedPointRNN: a stack of recurrent layers r_ℓ = f(W_ℓ r_ℓ + V_ℓ r_{ℓ−1} + b_ℓ), each solved
to its fixed point in turn, read out as W_out r_L + b_out. One layer with a fixed random read-in
V_1 = W_in and read-out, no biases, is the paper's network (section 3.2)."""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from fprnn.core import implicit, solvers
from fprnn.core.activations import get_activation
from fprnn.core.checks import positive_int
from fprnn.core.dynamics import get_dynamics
from fprnn.models.encoders import build_encoder
from fprnn.models.network import StaticNetwork
from fprnn.models.wiring import constrained_init, time_constants, wiring
from fprnn.core.solvers import Solution

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
    size: tuple | None = None   # a conv layer's maps (H, W) that the rows hold; None: not maps


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


def _sizes(N, layers) -> list[int]:
    """The layer sizes from ``N`` (one layer) or ``layers`` (a list), whichever is given."""
    if (N is None) == (layers is None):
        raise ValueError(f"give the layer sizes once: N (one layer) or layers (a list), got "
                         f"N={N!r}, layers={layers!r}; set the other to null")
    sizes = [N] if layers is None else list(layers) if isinstance(layers, (list, tuple)) else None
    if not sizes or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in sizes):
        raise ValueError(f"N must be a positive integer, got {N!r}" if layers is None else
                         f"layers must be a non-empty list of positive integers, got {layers!r}")
    return sizes


def per_layer(name: str, value, L: int) -> list:
    """A setting shared by every layer, or a list of one value per layer."""
    if isinstance(value, (list, tuple)):
        if len(value) != L:
            raise ValueError(f"{name} lists {len(value)} values for {L} layers: give one value, or one per layer")
        return list(value)
    return [value] * L


class Layer(nn.Module):
    """One recurrent layer: r = f(W r + x), x = V s + b for the previous layer's rates s (the
    input for the first layer). ``V`` is a fixed buffer unless ``train_readin``; ``V`` is None when
    s is fed directly (x = s + b); ``b`` exists only with ``bias``. ``W`` learns unless
    ``train_W=False`` (with σ_W = 0: W ≡ 0, a feed-forward layer r = f(V s + b)).

    Excitatory/inhibitory networks (docs/concepts/constraints.md): ``n_exc`` makes the first units
    excitatory (``sign`` +1: their outgoing weights, columns of W, stay ≥ 0) and the rest
    inhibitory (≤ 0); ``p_connect`` or ``mask_path`` fix a connectivity ``mask`` (zeros stay zero),
    ``self_connections=False`` empties its diagonal; ``constraint`` says how every step keeps them
    (``project`` or ``reparam``). Such a W starts as |Z| ⊙ S ⊙ M with the magnitudes of
    ``blocks`` = [[J_EE, J_EI], [J_IE, J_II]] (the mean total weight a unit gets from each
    population; default σ_W for all four: balanced). ``tau`` (and ``tau_I`` for inhibitory units)
    are time constants: they move no fixed point, but stability and Euler's steps use them.

    ``fallback`` ({"method": "ptc", options…}, see [`fprnn.core.solvers.following.settle`][fprnn.core.solvers.following.settle]; None: off): with
    continuous dynamics, samples the solver leaves unconverged are solved again from their start
    by following the network's dynamics. The discrete network is its map: a sample the map does
    not settle has no fixed point the network reaches, and stays unconverged.

    Called on s, the layer returns its fixed point r∗; while autograd records, r∗ is a function of
    (W, V, b, s) whose backward is ``backward_rule`` ([`fprnn.core.implicit.RuleBackward`][fprnn.core.implicit.RuleBackward], w1 — the
    gradient — unless set): the rule's −ΔW for W, the implicit adjoint for s. ``report`` keeps the
    last call's fixed point, the samples it used and its fault."""

    def __init__(self, N: int, n_in: int | None, gen: torch.Generator, dt: torch.dtype, *, activation,
                 dynamics, solver: str, solver_kwargs: dict | None, sigma_W: float, train_W: bool,
                 train_readin: bool, bias: bool, bptt_steps: int, bptt_damping: float,
                 n_exc: float | int | None = None, p_connect: float | None = None, mask_path: str | None = None,
                 mask_seed: int | None = None, self_connections: bool = True, constraint: str = "project",
                 blocks=None, tau: float | None = None, tau_I: float | None = None, fallback=None):
        super().__init__()
        if not (isinstance(sigma_W, (int, float)) and math.isfinite(sigma_W) and sigma_W >= 0):
            raise ValueError(f"sigma_W must be a non-negative finite number, got {sigma_W!r}")
        self.act = get_activation(activation)
        self.dyn = get_dynamics(dynamics)
        self.solver_name = solver
        self.solver_kwargs = _solver_kwargs(solver, dict(solver_kwargs or {}))
        if solver == "direct" and not self.act.is_identity:
            raise ValueError(f"solver 'direct' solves the linear model only; activation is "
                             f"{self.act.name!r}: use 'anderson', 'iterate' or 'euler'")
        self.fallback = solvers.resolve_fallback(fallback)
        self.bptt_steps, self.bptt_damping = int(bptt_steps), float(bptt_damping)
        self.N, self.n_in = N, n_in
        # float64 normals, drawn in this order (W, then V, then the next layer's, then W_out):
        # one layer draws exactly the paper's network as fprnn always drew it
        Z = torch.randn(N, N, generator=gen, dtype=torch.float64)
        mask_gen = gen if mask_seed is None else torch.Generator().manual_seed(int(mask_seed))
        sign, mask = wiring(N, mask_gen, n_exc, p_connect, mask_path, self_connections, constraint)
        self.register_buffer("sign", None if sign is None else sign.to(dt))
        self.register_buffer("mask", mask)
        self.constraint = constraint
        W = sigma_W * Z.to(dt) / math.sqrt(N) if sign is None and mask is None else \
            constrained_init(Z, sign, mask, sigma_W if blocks is None else blocks).to(dt)
        self.register_buffer("tau", time_constants(N, tau, tau_I, sign, self.dyn, dt))
        if train_W:
            self.W = nn.Parameter(W)
        else:
            self.register_buffer("W", W)
        V = (torch.randn(N, n_in, generator=gen, dtype=torch.float64) / math.sqrt(n_in)).to(dt) if n_in else None
        if V is not None and train_readin:
            self.V = nn.Parameter(V)
        else:
            self.register_buffer("V", V)
        self.b = nn.Parameter(torch.zeros(N, dtype=dt)) if bias else None
        self.backward_rule = implicit.RuleBackward(rule="w1")
        self.report: implicit.Report | None = None

    def forward(self, s: Tensor) -> Tensor:
        """r∗ for the previous layer's rates (or the input) s; see the class docstring. Under
        ``bptt`` the rates come with autograd's graph through the unrolled solver (W's gradient
        times η, so that W.grad = −ΔW as for the rules)."""
        spec = self.backward_rule
        x = self.input(s)                   # with its graph: bptt unrolls from it
        with torch.no_grad():
            fp = self.fixed_point(x)
        self.report = implicit.Report(fp, implicit.used_samples(fp.solution, fp.r))
        if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (self.W, self.V, self.b, s))):
            return fp.r
        if spec.rule == "bptt":
            rate = self.unrolled(x, fp.solution.u, W=implicit.scale_grad(self.W, spec.eta))
            rate.register_hook(implicit.delta_hook(self.report, spec))
            return rate
        return implicit.attach(fp.r, fp.gain, self.W, self.V, self.b, s, spec, self.report)

    def set_loss_norm(self, n: float | None) -> None:
        """The n of the loss Σ L_i / n that the next backward differentiates (w2 depends on it:
        [`fprnn.core.implicit`][fprnn.core.implicit]); read at backward, so it may be set after the forward call."""
        self.backward_rule.set_loss_norm(n)

    @property
    def constrained(self) -> bool:
        return self.sign is not None or self.mask is not None

    def input(self, s: Tensor) -> Tensor:
        """x = V s + b, rows = samples."""
        x = s @ self.V.T if self.V is not None else s
        return x + self.b if self.b is not None else x

    def _solve(self, W: Tensor, x: Tensor, u0: Tensor | None) -> Solution:
        if self.solver_name == "direct":
            return solvers.direct(W, x)
        g = self.dyn.state_map(W, x, self.act)
        if u0 is None:
            u0 = torch.zeros_like(x)
        sol = solvers.SOLVERS[self.solver_name](g, u0, **self._solver_options())
        if self.fallback is not None and self.dyn.continuous:
            sol = solvers.settle(g, u0, sol, tau=self.tau, jac=self.dyn.state_jacobian(W, x, self.act),
                                 **self.fallback)
        return sol

    def _solver_options(self) -> dict:
        """The solver's options, with Euler's dt as this dynamics' step (1 for the discrete map)."""
        kw = dict(self.solver_kwargs)
        if self.solver_name == "euler":
            kw["dt"] = self.dyn.euler_dt(kw.get("dt", 0.01))
            if self.tau is not None:     # dt is then in the time constants' units: per-unit dt/τ
                kw["dt"] = kw["dt"] / self.tau
        return kw

    @torch.no_grad()
    def fixed_point(self, x: Tensor, u0: Tensor | None = None, W: Tensor | None = None) -> FixedPoint:
        """Solve r = f(W r + x) for a batch of inputs x (m, N) (already read in), starting from
        the state u0 (zeros by default; pass ``previous.solution.u`` for a warm start)."""
        W = self.W.detach() if W is None else W
        x = x.detach()
        return self._at(W, x, self._solve(W, x, u0))

    def _at(self, W: Tensor, x: Tensor, sol: solvers.Solution) -> FixedPoint:
        r = self.dyn.rate(sol.u, self.act)
        z = r @ W.T + x
        return FixedPoint(r, z, self.act.df(z), x, sol)

    @torch.no_grad()
    def solved_fixed_point(self, x: Tensor) -> FixedPoint:
        """The fixed point solved to tolerance, for what only means something at a true fixed
        point (stability, eq 2.3). The layer's own solver when it stops on a tolerance; under a
        fixed-step protocol (``euler`` with tol=None, the paper's forward pass, which stops short
        and, once W is unstable, nowhere near a fixed point) Anderson continues from where that
        protocol stopped — it converges to unstable fixed points too."""
        fp = self.fixed_point(x)
        if not (self.solver_name == "euler" and self.solver_kwargs.get("tol") is None):
            return fp
        W = self.W.detach()
        return self._at(W, x, solvers.anderson(self.dyn.state_map(W, x, self.act), fp.solution.u))

    @torch.no_grad()
    def reached_fixed_point(self, x: Tensor) -> FixedPoint:
        """The fixed point the dynamics reach from rest (u = 0), every sample followed by the
        fallback's method (ptc by default) whatever the solver does: where an input has several
        attracting fixed points this is the network's, which the solver's may not be."""
        if not self.dyn.continuous:
            raise ValueError(f"the {self.dyn.name!r} network is its own map: its solver follows its dynamics")
        W, x = self.W.detach(), x.detach()
        how = solvers.how_to_follow(self.fallback or solvers.DEFAULT_FALLBACK)
        sol = solvers.follow(self.dyn.state_map(W, x, self.act), torch.zeros_like(x), tol=self._tolerance(),
                             tau=self.tau, jac=self.dyn.state_jacobian(W, x, self.act), **how)
        return self._at(W, x, sol)

    def _tolerance(self) -> float:
        """The solver's tolerance, or Anderson's default under a fixed-step protocol."""
        tol = self.solver_kwargs.get("tol")
        return tol if tol is not None else inspect.signature(solvers.anderson).parameters["tol"].default

    def unrolled(self, x: Tensor, u0: Tensor | None = None, W: Tensor | None = None) -> Tensor:
        """Rates with an autograd graph through the solver's iterations (W's and x's), for
        ``rule=bptt``.

        With ``solver=euler`` all ``steps`` Euler steps from 0 are unrolled (e.g. 500): the forward
        pass itself under the paper's protocol (``euler_paper``, no tolerance); with a tolerance
        the forward pass stops each sample early, the unrolled one does not. Otherwise the fixed
        point is solved without a graph and ``bptt_steps`` damped steps (``bptt_damping``) are
        unrolled from it (truncated BPTT), starting the solve from ``u0`` if given."""
        if self.solver_name == "euler":
            kw = self._solver_options()
            damping, steps = kw["dt"], int(kw.get("steps", 500))
            u = torch.zeros_like(x)
        else:
            u = self.fixed_point(x, u0).solution.u
            steps, damping = self.bptt_steps, self.bptt_damping
        g = self.dyn.state_map(self.W if W is None else W, x, self.act)
        return self.dyn.rate(implicit.unroll(g, u, steps, damping), self.act)

    def stability(self, fp: FixedPoint) -> Tensor:
        """Per-sample stability value (max Re λ(G_i W) or ρ(G_i W), with time constants
        1 + τ_min max Re λ(T⁻¹(−I + G_i W))); stable iff < 1."""
        return self.dyn.stability(self.W.detach(), fp.gain, self.tau)


class FixedPointRNN(StaticNetwork):
    """A stack of recurrent layers trained on their fixed points.

    ``layers`` (or ``N`` for one layer) gives the sizes. Layer ℓ's W_ℓ is σ_W Z/√N_ℓ, its read-in
    V_ℓ is Z/√N_{ℓ−1} (the input size for the first), the read-out W_out is Z/√N_L; biases start at
    zero. Read-in and read-out are fixed random buffers, as in the paper, unless ``train_readin``
    / ``train_readout``. ``n_in=None`` feeds the input directly to the first layer (x = p, the
    linear task); ``n_out=None`` reads r_L itself out. ``train_W=False, sigma_W=0``: every W ≡ 0,
    the same network as a feed-forward one (the baseline the recurrence is measured against).
    ``activation``, ``dynamics``, ``solver``,
    ``solver_kwargs``, ``sigma_W`` and ``fallback`` are shared by the layers, or lists of one per
    layer. ``encoder`` (a spec, [`fprnn.models.encoders`][fprnn.models.encoders]; None: none) is a front end between the raw
    input (n_in values) and the first layer's read-in, trained by autograd. ``fallback`` (default: `fprnn.core.solvers.following.DEFAULT_FALLBACK`, pseudo-transient
    continuation) re-solves the samples the solver leaves by following the dynamics (``Layer``).
    """

    def __init__(self, N: int | None = None, n_in: int | None = None, n_out: int | None = None, *,
                 layers: Sequence[int] | None = None, activation: Any = "tanh", dynamics: Any = "rate",
                 solver: Any = "anderson", solver_kwargs: Any = None, sigma_W: Any = 0.5, seed: int = 0,
                 dtype: Any = "float32", bptt_steps: int = 50, bptt_damping: float = 0.5,
                 train_W: bool = True, train_readin: bool = False, train_readout: bool = False,
                 bias: bool = False, n_exc: Any = None, p_connect: Any = None, mask_path: Any = None,
                 mask_seed: Any = None, self_connections: Any = True, constraint: Any = "project", blocks=None,
                 tau: Any = None, tau_I: Any = None, fallback: Any = "default", encoder: Any = None):
        super().__init__()
        sizes = _sizes(N, layers)
        for name, v in (("n_in", n_in), ("n_out", n_out)):
            if v is not None:
                positive_int(name, v)
        for name, v in (("train_W", train_W), ("train_readin", train_readin), ("train_readout", train_readout),
                        ("bias", bias)):
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false, got {v!r}")
        L = len(sizes)
        if n_in is None and L > 1:
            raise ValueError(f"a stack of {L} layers needs a read-in: set n_in")
        if train_readin and n_in is None:
            raise ValueError("train_readin=true needs a read-in to train: set n_in")
        if train_readout and n_out is None:
            raise ValueError("train_readout=true needs a read-out to train: set n_out")
        dt = get_dtype(dtype)
        gen = torch.Generator().manual_seed(int(seed))
        shared = dict(activation=activation, dynamics=dynamics, solver=solver, solver_kwargs=solver_kwargs,
                      sigma_W=sigma_W, n_exc=n_exc, p_connect=p_connect, mask_path=mask_path, mask_seed=mask_seed,
                      self_connections=self_connections, constraint=constraint, tau=tau, tau_I=tau_I,
                      fallback=fallback)
        per = {k: per_layer(k, v, L) for k, v in shared.items()}
        with torch.random.fork_rng():      # torch's own init, seeded, without drawing from gen
            torch.manual_seed(int(seed))
            self.encoder = build_encoder(encoder)
        if self.encoder is not None:
            self.encoder.to(dt)
            if n_in != self.encoder.in_features:
                raise ValueError(f"n_in={n_in!r} must be the encoder's input size "
                                 f"{'×'.join(map(str, self.encoder.in_shape))} = {self.encoder.in_features}")
        fan_in = [n_in if self.encoder is None else self.encoder.out_features, *sizes[:-1]]
        self.layers = nn.ModuleList(
            Layer(sizes[l], fan_in[l], gen, dt, train_W=train_W, train_readin=train_readin, bias=bias,
                  bptt_steps=bptt_steps, bptt_damping=bptt_damping, blocks=blocks,
                  **{k: v[l] for k, v in per.items()}) for l in range(L))
        self.sizes, self.n_in, self.n_out, self.N = sizes, n_in, n_out, sizes[-1]
        self.train_readin, self.train_readout, self.bias = train_readin, train_readout, bias
        W_out = (torch.randn(n_out, sizes[-1], generator=gen, dtype=torch.float64) / math.sqrt(sizes[-1])).to(dt) \
            if n_out else None
        if W_out is not None and train_readout:
            self.W_out = nn.Parameter(W_out)
        else:
            self.register_buffer("W_out", W_out)
        self.b_out = nn.Parameter(torch.zeros(n_out, dtype=dt)) if (bias and n_out) else None
        # the constructor's arguments, so that a run can be rebuilt (FixedPointRNN.load); None when
        # an activation or dynamics is an object rather than a name
        named = all(isinstance(v, (str, dict)) for k in ("activation", "dynamics") for v in per[k])
        shared["fallback"] = [layer.fallback for layer in self.layers] if isinstance(fallback, (list, tuple)) \
            else self.layers[0].fallback
        kws = [dict(layer.solver_kwargs) for layer in self.layers]
        shared["solver_kwargs"] = kws if isinstance(solver_kwargs, (list, tuple)) else kws[0]
        self.config = dict(N=N, n_in=n_in, n_out=n_out, layers=None if layers is None else sizes, **shared,
                           seed=seed, dtype=str(dt).replace("torch.", ""), bptt_steps=int(bptt_steps),
                           bptt_damping=float(bptt_damping), train_W=train_W, train_readin=train_readin,
                           train_readout=train_readout, bias=bias, blocks=blocks, encoder=encoder) if named else None

    @classmethod
    def load(cls, path, map_location="cpu") -> "FixedPointRNN":
        """The trained network of a finished run, from ``run_dir/model.json`` (the constructor's
        arguments) and ``run_dir/weights.pt`` (its state dict): ready to predict (``net(p)``) and
        to analyse (``fixed_points``, ``layers[ℓ].stability``). ``path`` may also be one of the
        run's checkpoints (``run_dir/checkpoints/best.ckpt`` or ``last.ckpt``): that network."""
        return super().load(path, map_location)

    def readins(self) -> list[Tensor]:
        """The trained read-in tensors (the encoder's, V_ℓ, b_ℓ), in the order of ``named_readins``."""
        return [t for _, t in self.named_readins()]

    def named_readins(self) -> list[tuple[str, Tensor]]:
        front = [] if self.encoder is None else [(f"encoder.{n}", t) for n, t in self.encoder.named_parameters()]
        return front + [(f"layers.{l}.{n}", t) for l, layer in enumerate(self.layers) for n in ("V", "b")
                        if isinstance(t := getattr(layer, n), nn.Parameter)]

    def named_readouts(self) -> list[tuple[str, Tensor]]:
        return [(n, t) for n in ("W_out", "b_out") if isinstance(t := getattr(self, n), nn.Parameter)]

    # -- maps ---------------------------------------------------------------------------
    def check_input(self, p: Tensor) -> Tensor:
        want = self.n_in or self.layers[0].N
        if p.dim() != 2 or p.shape[1] != want:
            raise ValueError(f"input must be (m, {want}), got shape {tuple(p.shape)}")
        return p.to(self.dtype)

    def features(self, p: Tensor) -> Tensor:
        """What the first layer reads: the encoder's output for raw inputs p, or p itself."""
        p = self.check_input(p)
        return p if self.encoder is None else self.encoder(p)

    def readout(self, r: Tensor) -> Tensor:
        out = r @ self.W_out.T if self.W_out is not None else r
        return out + self.b_out if self.b_out is not None else out

    @torch.no_grad()
    def fixed_points(self, p: Tensor, solved: bool = False) -> list[FixedPoint]:
        """The fixed point of every layer for raw inputs p (m, n_in), solved in order (layer ℓ's
        input is layer ℓ−1's rates). ``solved=True``: each solved to tolerance (see
        ``Layer.solved_fixed_point``), for stability."""
        s, fps = self.features(p), []
        for layer in self.layers:
            x = layer.input(s)
            fps.append(layer.solved_fixed_point(x) if solved else layer.fixed_point(x))
            s = fps[-1].r
        return fps

    def unrolled(self, p: Tensor, start: list[Tensor] | None = None) -> Tensor:
        """The last layer's rates with an autograd graph through every layer (``Layer.unrolled``);
        ``start``: each layer's state to solve from (e.g. the forward pass's)."""
        s = self.features(p)
        for l, layer in enumerate(self.layers):
            s = layer.unrolled(layer.input(s), None if start is None else start[l])
        return s

    @torch.no_grad()
    def multistable(self, p: Tensor, atol: float = 1e-3) -> Tensor:
        """Per input (m,): whether, in some layer, the solver's fixed point (solved to tolerance)
        is not the one the dynamics reach from rest (``Layer.reached_fixed_point``, more than
        ``atol`` apart in ‖·‖∞, both converged) — an input with several attracting fixed points
        whose solver picked another than the network's."""
        s = self.features(p)
        differ = torch.zeros(len(s), dtype=torch.bool, device=s.device)
        for layer in self.layers:
            x = layer.input(s)
            mine, reached = layer.solved_fixed_point(x), layer.reached_fixed_point(x)
            both = reached.solution.converged
            if mine.solution.tol is not None:
                both = both & mine.solution.converged
            differ |= both & ((mine.r - reached.r).abs().amax(1) > atol)
            s = mine.r
        return differ

    @torch.no_grad()
    def scale_to_stable(self, p: Tensor, target: float = 0.9, factor: float = 0.8, tries: int = 40) -> float:
        """Scale every layer's W by ``factor`` until the fixed points of the inputs p converge in
        every layer with stability below ``target`` (an initialisation that starts stable: a
        strong random E/I W often has no attracting fixed point). Returns the scale applied."""
        if not 0 < target <= 1:
            raise ValueError(f"stable_init must be in (0, 1] (stability below it), got {target!r}")
        scale = 1.0
        for _ in range(tries):
            fps = self.fixed_points(p, solved=True)
            ok = all(bool(torch.isfinite(fp.r).all()) and (fp.solution.tol is None or fp.solution.n_nonconverged == 0)
                     for fp in fps)
            if ok and max(float(layer.stability(fp).max()) for layer, fp in zip(self.layers, fps)) < target:
                return scale
            for layer in self.layers:
                layer.W.mul_(factor)
            scale *= factor
        raise ValueError(f"stable_init={target}: W scaled down to {scale:.3g} of its start and the probe's "
                         f"fixed points still do not converge below stability {target}")

    def set_backward(self, rule: str = "w1", eta: float = 1.0, rule_kwargs: Any = None, **options) -> None:
        """How autograd's backward treats every layer's fixed point ([`fprnn.core.implicit.RuleBackward`][fprnn.core.implicit.RuleBackward]):
        the ``rule`` for each W (``"bptt"``: through the unrolled solver) with η = ``eta``; ``rule_kwargs``
        a dict, or a list of one per layer; ``options``: readin, loss_norm, throw, gather."""
        per = per_layer("rule_kwargs", rule_kwargs, len(self.layers))
        for layer, kw in zip(self.layers, per):
            layer.backward_rule = implicit.RuleBackward(rule, eta, implicit.resolve_rule_kwargs(rule, kw, layer),
                                                        **options)

    def forward(self, p: Tensor) -> Tensor:
        """Read-out of the last layer's fixed point for raw inputs p. While autograd records, the
        output has a graph whose backward gives each W its rule's −ΔW (``set_backward``; w1, the
        gradient, by default) and every other tensor its gradient."""
        s = self.features(p)
        for layer in self.layers:
            s = layer(s)
        return self.readout(s)

    @property
    def used(self) -> Tensor:
        """Per input of the last call: its fixed point converged (and is finite) in every layer —
        the samples a loss should be on (the rest have no fixed point for a rule to work on)."""
        if any(layer.report is None for layer in self.layers):
            raise RuntimeError("no forward call yet: FixedPointRNN.used describes the last call")
        used = self.layers[0].report.used
        for layer in self.layers[1:]:
            used = used & layer.report.used
        return used

    # -- the paper's one-layer network: its layer's members ------------------------------
    @property
    def layer(self) -> Layer:
        """The one recurrent layer; a stack's are ``layers[ℓ]``."""
        if len(self.layers) != 1:
            raise ValueError(f"this network has {len(self.layers)} layers: use layers[ℓ]")
        return self.layers[0]

    W = property(lambda self: self.layer.W, doc="the one layer's W")
    W_in = property(lambda self: self.layer.V, doc="the one layer's read-in")
    act = property(lambda self: self.layer.act)
    dyn = property(lambda self: self.layer.dyn)

    def input(self, p: Tensor) -> Tensor:
        """x = W_in p (+ b) for raw inputs p, with the one layer's read-in."""
        return self.layer.input(self.features(p))

    def fixed_point(self, x: Tensor, u0: Tensor | None = None, W: Tensor | None = None) -> FixedPoint:
        return self.layer.fixed_point(x, u0, W)

    def solved_fixed_point(self, x: Tensor) -> FixedPoint:
        return self.layer.solved_fixed_point(x)

    def stability(self, fp: FixedPoint) -> Tensor:
        return self.layer.stability(fp)
