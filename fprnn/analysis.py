"""What a neuroscientist asks of a fitted network at its fixed points: is it stable (with its time
constants), is it inhibition-stabilized, and how does it answer a small extra input — paradoxically?

All functions take a layer's W (N, N) and the gains G_i = f'(z_i) of its fixed points (m, N),
rows = samples, as the rules do; ``sign`` (N,) marks excitatory (+1) and inhibitory (−1) units.
"""
from __future__ import annotations

import torch

from .dynamics import eig_W, get_dynamics
from .model import FixedPointRNN

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
    sample's fixed point is stable when it is in every layer."""
    p = p.to(model.dtype).to(model.layers[0].W.device)
    fps = model.fixed_points(p, solved=True)
    out: dict[str, float] = {}
    stable = torch.ones(len(p), dtype=torch.bool, device=p.device)
    L = len(fps)
    for l, (layer, fp) in enumerate(zip(model.layers, fps)):
        s = layer.stability(fp)
        stable &= s < 1
        re_W, rho_W = eig_W(layer.W)
        one = {"max_re_eig": float(s.max()), "frac_stable": float((s < 1).float().mean()),
               "max_re_eig_W": re_W, "spectral_radius_W": rho_W,
               "probe_residual": float(fp.solution.residual.max())}
        for k, v in one.items():
            if k != "frac_stable":      # for the whole stack: the samples stable in every layer
                out[k] = max(out.get(k, v), v)
            if L > 1:
                out[f"{k}/{l}"] = v
    out["frac_stable"] = float(stable.float().mean())
    return out
