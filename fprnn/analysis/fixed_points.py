"""What a neuroscientist asks of a fitted network at its fixed points: is it stable (with its time
constants), is it inhibition-stabilized, and how does it answer a small extra input — paradoxically?

All functions take a layer's W (N, N) and the gains G_i = f'(z_i) of its fixed points (m, N),
rows = samples, as the rules do; ``sign`` (N,) marks excitatory (+1) and inhibitory (−1) units.
"""
from __future__ import annotations

import torch

from fprnn.core.dynamics import eig_W, get_dynamics
from fprnn.models.dense import FixedPointRNN

Tensor = torch.Tensor


def _eye(W: Tensor) -> Tensor:
    return torch.eye(W.shape[0], dtype=W.dtype, device=W.device)


def isn_index(W: Tensor, gain: Tensor, sign: Tensor) -> Tensor:
    """Per sample, max Re λ(G_E W_EE): the excitatory subnetwork alone, inhibition held fixed,
    at the fixed point's gains. Above 1 it would be unstable on its own, so the network is
    inhibition-stabilized (ISN) if the whole is stable."""
    exc = sign > 0
    return get_dynamics("rate").stability(W[exc][:, exc], gain[:, exc])


def linear_response(W: Tensor, gain: Tensor, dx: Tensor) -> Tensor:
    """The fixed point's response dr = (I − G W)⁻¹ G dx to a small extra input dx (N,) or (m, N):
    differentiating r = f(W r + x) gives dr = G (W dr + dx). Same for rate and voltage dynamics
    (they share the fixed points)."""
    m = gain.shape[0]
    dx = dx.expand(m, -1) if dx.dim() == 1 else dx
    A = _eye(W) - gain.unsqueeze(-1) * W
    return torch.linalg.solve(A, (gain * dx).unsqueeze(-1)).squeeze(-1)


def paradoxical(W: Tensor, gain: Tensor, sign: Tensor) -> tuple[Tensor, Tensor]:
    """The inhibitory population's mean rate change per unit of extra input to every inhibitory
    unit, per sample, and whether it is paradoxical (< 0: inhibitory rates fall when their input
    rises — the signature of an inhibition-stabilized network)."""
    inh = (sign < 0).to(W.dtype)
    dr = linear_response(W, gain, inh)
    mean_I = (dr * inh).sum(1) / inh.sum()
    return mean_I, mean_I < 0


@torch.no_grad()
def analyse(model: FixedPointRNN, p: Tensor) -> dict[str, float]:
    """Stability, ISN index and the paradoxical response at the fixed points of inputs p, for
    every layer of ``model`` (suffix ``/ℓ`` in a stack): the fractions of samples stable, ISN and
    paradoxical, the mean ISN index and I-population response."""
    fps = model.fixed_points(p.to(model.dtype), solved=True)
    out: dict[str, float] = {}
    L = len(fps)
    for l, (layer, fp) in enumerate(zip(model.layers, fps)):
        sfx = "" if L == 1 else f"/{l}"
        W = layer.W.detach()
        s = layer.stability(fp)
        out[f"frac_stable{sfx}"] = float((s < 1).float().mean())
        out[f"max_stability{sfx}"] = float(s.max())
        if layer.sign is not None and bool((layer.sign < 0).any()):
            isn = isn_index(W, fp.gain, layer.sign)
            resp, para = paradoxical(W, fp.gain, layer.sign)
            out.update({f"isn_index{sfx}": float(isn.mean()), f"frac_isn{sfx}": float((isn > 1).float().mean()),
                        f"inh_response{sfx}": float(resp.mean()),
                        f"frac_paradoxical{sfx}": float(para.float().mean())})
    return out


@torch.no_grad()
def probe_stability(model: FixedPointRNN, p: Tensor) -> dict[str, float]:
    """Stability of the fixed points of a probe batch (solved to tolerance, see
    ``Layer.solved_fixed_point``), the largest residual of that solve, and eig(W): the worst
    layer's under the plain names, with a stack each layer's too (``max_re_eig/ℓ``, …). A
    sample's fixed point is stable when it is in every layer. A conv layer's (fprnn.models.conv) stability
    value is ρ(G_i W) by power iteration, under the same key; it has no W matrix to take eig(W) of."""
    p = p.to(model.dtype).to(model.layers[0].W.device)
    fps = model.fixed_points(p, solved=True)
    out: dict[str, float] = {}
    stable = torch.ones(len(p), dtype=torch.bool, device=p.device)
    L = len(fps)
    for l, (layer, fp) in enumerate(zip(model.layers, fps)):
        s = layer.stability(fp)
        stable &= s < 1
        one = {"max_re_eig": float(s.max()), "frac_stable": float((s < 1).float().mean()),
               "probe_residual": float(fp.solution.residual.max())}
        if layer.W.dim() == 2:      # a conv layer's W is an operator: no eigenvalues of a matrix here
            one["max_re_eig_W"], one["spectral_radius_W"] = eig_W(layer.W)
        for k, v in one.items():
            if k != "frac_stable":      # for the whole stack: the samples stable in every layer
                out[k] = max(out.get(k, v), v)
            if L > 1:
                out[f"{k}/{l}"] = v
    out["frac_stable"] = float(stable.float().mean())
    return out


# -- fixed points of a network in time ------------------------------------------------------
@torch.no_grad()
def find_fixed_points(W: Tensor, x: Tensor, starts: Tensor, act, tau: Tensor | None = None, tol: float = 1e-10,
                      max_iter: int = 100, distinct: float = 1e-6) -> list[dict]:
    """Every fixed point r = f(W r + x) of the constant input x (N,) that Newton's method reaches
    from the states ``starts`` (S, N) — stable or not (Sussillo & Barak 2013 look for them from the
    states the trials visit; Newton converges to saddles and unstable points too, which following
    the dynamics would not). A step is halved while it does not reduce ‖F‖, F(r) = f(W r + x) − r.
    Points closer than ``distinct`` (‖·‖∞) are one. Each comes with the eigenvalues of the
    dynamics' Jacobian J = T⁻¹(−I + G W) (T = diag τ; without τ in units of 1/τ), sorted by real
    part, largest first, and ``stable`` (max Re λ < 0)."""
    r = starts.to(W.dtype).clone()
    eye = torch.eye(W.shape[0], dtype=W.dtype, device=W.device)

    def residual(r):
        return act.f(r @ W.T + x) - r

    F = residual(r)
    for _ in range(max_iter):
        norm = F.abs().amax(1)
        if bool((norm < tol).all()):
            break
        J = act.df(r @ W.T + x).unsqueeze(-1) * W - eye
        step = torch.linalg.solve(J, -F.unsqueeze(-1)).squeeze(-1)
        scale = torch.ones(len(r), 1, dtype=W.dtype, device=W.device)
        for _ in range(20):         # halve each sample's step until its ‖F‖ falls
            F_new = residual(r + scale * step)
            worse = ~(F_new.abs().amax(1) < norm) & (norm >= tol)
            if not bool(worse.any()):
                break
            scale[worse] *= 0.5
        r = torch.where((norm >= tol).unsqueeze(1), r + scale * step, r)
        F = residual(r)
    found: list[dict] = []
    for i in (F.abs().amax(1) < tol).nonzero().squeeze(1).tolist():
        if any(float((r[i] - p["r"]).abs().max()) < distinct for p in found):
            continue
        J = act.df(r[i] @ W.T + x).unsqueeze(1) * W - eye
        if tau is not None:
            J = J / tau.to(W.dtype).unsqueeze(1)
        eig = torch.linalg.eigvals(J)
        eig = eig[torch.argsort(eig.real, descending=True)]
        found.append({"r": r[i].clone(), "eig": eig, "max_re": float(eig.real[0]), "stable": bool(eig.real[0] < 0),
                      "residual": float(F[i].abs().max())})
    return found


@torch.no_grad()
def trial_fixed_points(model, inputs: Tensor, starts: Tensor, **kw) -> list[list[dict]]:
    """The fixed points of a network in time ([`fprnn.models.ctrnn.TrialRNN`][fprnn.models.ctrnn.TrialRNN]) for each constant
    input u (rows of ``inputs``, (K, n_in)): [`find_fixed_points`][fprnn.analysis.fixed_points.find_fixed_points] with x = V u + b and the
    network's τ in its unit (eigenvalues per ms when τ is in ms), from ``starts`` (states the
    trials visit)."""
    layer = model.layer
    W, dt = layer.W.detach().double(), torch.float64
    X = layer.input(inputs.to(model.dtype)).detach().to(dt)
    tau = None if layer.tau is None else layer.tau.to(dt)
    return [find_fixed_points(W, x, starts.to(dt), layer.act, tau, **kw) for x in X]
