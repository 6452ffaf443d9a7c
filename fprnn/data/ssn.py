"""A stabilized supralinear network (SSN) teacher: recorded-looking steady-state responses to fit.

The teacher is an E/I network of the kind fitted to visual cortex (Rubin et al. 2015): N units,
80% excitatory, Dale's law, sparse random connectivity with E/I block strengths, supralinear units
k[z]₊ⁿ with a smooth rate bound, τ_E = 20, τ_I = 10. Each unit prefers an orientation; a stimulus
(orientation θ, contrast c) drives unit i with c·exp((cos 2(θ − θ_i) − 1)/κ). Its fixed-point rates
of ``n_record`` randomly chosen units, at ``n_orient`` orientations × ``contrasts``, are the
training set; the same contrasts at the orientations halfway between are the held-out stimuli.
"""
from __future__ import annotations

import math

import torch

from fprnn.data.datamodules import ResponsesDataModule
from fprnn.models.dense import FixedPointRNN

Tensor = torch.Tensor
CONTRASTS = (2.0, 5.0, 10.0, 20.0, 40.0, 60.0)
BLOCKS = ((1.5, 1.5), (1.5, 1.0))       # [[J_EE, J_EI], [J_IE, J_II]]: an ISN at contrasts 40 and 60


def ssn(N: int = 200, seed: int = 0, blocks=BLOCKS, **kw) -> FixedPointRNN:
    """An SSN as described above. The teacher's connectivity mask is drawn from ``mask_seed``
    (default: its seed); a student given the same mask_seed shares it — the known-wiring case —
    and draws its own weights from its own seed."""
    kw.setdefault("mask_seed", seed)
    opts = dict(activation={"name": "powerlaw", "k": 0.04, "n": 2.0, "r_max": 200.0}, n_exc=0.8, p_connect=0.2,
                self_connections=False, tau=20.0, tau_I=10.0, dtype="float64", solver="anderson",
                solver_kwargs={"tol": 1e-8, "max_iter": 1000})
    opts.update(kw)
    return FixedPointRNN(N, None, None, seed=seed, blocks=[list(b) for b in blocks], **opts)


def preferred_orientations(sign: Tensor) -> Tensor:
    """Evenly spaced preferred orientations in [0, π) within each population."""
    pref = torch.empty(len(sign), dtype=torch.float64)
    for pop in (sign > 0, sign < 0):
        n = int(pop.sum())
        pref[pop] = torch.arange(n, dtype=torch.float64) / max(n, 1) * math.pi
    return pref


def stimuli(pref: Tensor, thetas: Tensor, contrasts, kappa: float = 0.5) -> Tensor:
    """Inputs (len(contrasts)·len(thetas), N): c·exp((cos 2(θ − θ_i) − 1)/κ), contrast-major."""
    return torch.stack([c * torch.exp((torch.cos(2 * (th - pref)) - 1) / kappa) for c in contrasts for th in thetas])


def teacher_responses(N: int = 200, n_record: int = 50, n_orient: int = 12, contrasts=CONTRASTS,
                      kappa: float = 0.5, teacher_seed: int = 1234) -> tuple[dict[str, Tensor], FixedPointRNN]:
    """The arrays of a responses file (X, R, units, X_test, R_test) and the teacher network."""
    if not 0 < n_record <= N:
        raise ValueError(f"n_record must be in 1..N={N}, got {n_record!r}")
    net = ssn(N, seed=teacher_seed)
    pref = preferred_orientations(net.layers[0].sign)
    step = math.pi / n_orient
    thetas = torch.arange(n_orient, dtype=torch.float64) * step
    X, Xt = stimuli(pref, thetas, contrasts, kappa), stimuli(pref, thetas + step / 2, contrasts, kappa)
    g = torch.Generator().manual_seed(teacher_seed + 1)
    units = torch.randperm(N, generator=g)[:n_record].sort().values
    fps, fpt = net.fixed_points(X)[0], net.fixed_points(Xt)[0]
    for name, fp in (("training", fps), ("held-out", fpt)):
        if fp.solution.n_nonconverged:
            raise ValueError(f"the SSN teacher has no converged fixed point for {fp.solution.n_nonconverged} "
                             f"{name} stimuli; lower the contrasts")
    return {"X": X, "R": fps.r[:, units], "units": units, "X_test": Xt, "R_test": fpt.r[:, units]}, net


class SSNTeacherData(ResponsesDataModule):
    """``data=ssn_teacher``: the teacher's responses (``teacher_responses``) as a responses data
    set, input fed directly (x = the stimulus drive). ``self.teacher`` is the teacher network."""

    def __init__(self, N: int = 200, n_record: int = 50, n_orient: int = 12, contrasts=CONTRASTS,
                 kappa: float = 0.5, teacher_seed: int = 1234, **split):
        arrays, self.teacher = teacher_responses(N, n_record, n_orient, tuple(contrasts), kappa, teacher_seed)
        super().__init__(arrays=arrays, direct=True, **split)
        self.name, self.contrasts, self.n_orient = "ssn_teacher", tuple(contrasts), n_orient
