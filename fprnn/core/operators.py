"""The recurrent weights W as an operator: what the rules of [`fprnn.core.rules`][fprnn.core.rules] use of W.

Every rule's per-sample step is rank one, ΔW_i = u_i v_iᵀ, and its factors need W only through
products W r_i and Wᵀ p_i. So a rule needs three things of W (rows = samples):

- ``op(R)``: the rows W r_i;
- ``op.T(P)``: the rows Wᵀ p_i;
- ``op.outer(U, V)``: the step on W's *parameters* that Σ_i u_i v_iᵀ is — for a dense W the matrix
  itself; for a structured W = M(θ) (M linear) the adjoint Mᵀ(Σ u_i v_iᵀ), i.e. the gradient of
  Σ_i u_iᵀ M(θ) v_i in θ (docs/concepts/rules.md, "Rules on a structured W").

[`Dense`][fprnn.core.operators.Dense] is the paper's N×N matrix (the products the rules always took, bit for bit);
[`Conv2d`][fprnn.core.operators.Conv2d] a convolution on C×H×W maps, never forming its N×N matrix (N = C·H·W).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

PADDINGS = ("zeros", "circular")
#: how a row holds a C×H×W map: ``chw`` (channels first, torch's flatten of an (m, C, H, W) batch)
#: or ``hwc`` (channels last: the rows are then channels-last maps, which a CPU convolution takes
#: without reordering them; ``python -m fprnn.bench --only conv`` times both)
LAYOUTS = ("chw", "hwc")


def to_maps(R: Tensor, channels: int, size, layout: str = "chw") -> Tensor:
    """Rows (m, N) as maps (m, C, H, W): a view, with channels-last strides for ``hwc``."""
    if layout == "chw":
        return R.reshape(len(R), channels, *size)
    return R.reshape(len(R), *size, channels).permute(0, 3, 1, 2)


def to_rows(X: Tensor, layout: str = "chw") -> Tensor:
    """Maps (m, C, H, W) as rows (m, N) in ``layout``: a view when X's strides allow it."""
    return (X if layout == "chw" else X.permute(0, 2, 3, 1)).reshape(len(X), -1)


class Dense:
    """A dense N×N W: products with W and Wᵀ, Σ u_i v_iᵀ as it is."""

    def __init__(self, W: Tensor):
        if not isinstance(W, Tensor) or W.dim() != 2 or W.shape[0] != W.shape[1]:
            raise ValueError(f"W must be a square (N, N) tensor, got shape {tuple(getattr(W, 'shape', ()))}")
        self.W = W
        self.n, self.dtype, self.device = W.shape[0], W.dtype, W.device

    def __call__(self, R: Tensor) -> Tensor:
        return R @ self.W.T

    def T(self, P: Tensor) -> Tensor:
        return P @ self.W

    def outer(self, U: Tensor, V: Tensor) -> Tensor:
        return U.T @ V


class Conv2d:
    """W r = K ⋆ r for r a C×H×W map flattened to N = C·H·W: stride 1, an odd k×k kernel
    K (C, C, k, k), padding that keeps the size — ``zeros`` or ``circular`` (a torus: W is then
    block-circulant). Wᵀ is the correlation with the kernel transposed in its channels and flipped
    in space, with the same padding; the step on K of Σ u_i v_iᵀ is one
    ``torch.nn.grad.conv2d_weight`` over the whole batch — no N×N matrix, no per-sample loop.
    ``layout`` (`LAYOUTS`) is the order of a map's entries in a row; W is the same operator
    in either, its matrix permuted."""

    def __init__(self, K: Tensor, size, padding: str = "zeros", layout: str = "chw"):
        if not isinstance(K, Tensor) or K.dim() != 4 or K.shape[0] != K.shape[1] or K.shape[2] != K.shape[3] \
                or K.shape[2] % 2 == 0:
            raise ValueError(f"the kernel K must be (C, C, k, k) with k odd, got shape {tuple(getattr(K, 'shape', ()))}")
        if not (isinstance(size, (tuple, list)) and len(size) == 2
                and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ValueError(f"size must be the maps' (height, width) as positive integers, got {size!r}")
        if padding not in PADDINGS:
            raise ValueError(f"unknown padding {padding!r}; choose one of {list(PADDINGS)}")
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {list(LAYOUTS)}")
        k = K.shape[2]
        if padding == "circular" and k // 2 > min(size):
            raise ValueError(f"circular padding of a {k}×{k} kernel needs maps of at least {k // 2}×{k // 2}, got {tuple(size)}")
        self.K, self.size, self.padding, self.layout = K, tuple(size), padding, layout
        self.channels, self.pad = K.shape[0], k // 2
        self.n = self.channels * size[0] * size[1]
        self.dtype, self.device = K.dtype, K.device
        self._flipped = K.transpose(0, 1).flip(-1, -2)

    def maps(self, R: Tensor) -> Tensor:
        return to_maps(R, self.channels, self.size, self.layout)

    def rows(self, X: Tensor) -> Tensor:
        return to_rows(X, self.layout)

    def _maps(self, R: Tensor) -> tuple[Tensor, int]:
        """Rows (m, N) as maps and the padding the convolution is to add: zero padding is the
        convolution's own (a separate pad would copy the batch first);
        circular padding is applied here, leaving none to add."""
        X = self.maps(R)
        if self.padding == "zeros":
            return X, self.pad
        p = self.pad
        X = F.pad(X, (p, p, p, p), mode="circular")
        return (X if self.layout == "chw" else X.contiguous(memory_format=torch.channels_last)), 0

    def __call__(self, R: Tensor) -> Tensor:
        X, p = self._maps(R)
        return self.rows(F.conv2d(X, self.K, padding=p))

    def T(self, P: Tensor) -> Tensor:
        X, p = self._maps(P)
        return self.rows(F.conv2d(X, self._flipped, padding=p))

    def outer(self, U: Tensor, V: Tensor) -> Tensor:
        X, p = self._maps(V)
        return torch.nn.grad.conv2d_weight(X, self.K.shape, self.maps(U), padding=p)

    def matrix(self) -> Tensor:
        """The N×N matrix of W (column j = W e_j), for tests and small maps only."""
        return self(torch.eye(self.n, dtype=self.dtype, device=self.device)).T


def kernel_norm_bound(K: Tensor, grid: int = 64) -> Tensor:
    """A certain upper bound on ‖W‖₂ of the convolution with K (C, C, k, k), for every map size and
    either padding. With zero padding W is a block of the convolution on the infinite plane; with
    circular padding on n×n maps its norm is the plane's frequency response at n² frequencies; so
    both are at most S = sup_ω σ_max(K̂(ω)), K̂(ω) = Σ_ab K_ab e^{−iω·(a,b)}, a C×C matrix of
    trigonometric polynomials of degree d = k // 2 in each frequency. On a ``grid``² of frequencies
    (K real: half of them) the largest σ_max is G; every ω is within π/grid of a grid point in each
    coordinate, and by Bernstein's inequality (|∂_ω uᴴK̂v| ≤ d S for unit u, v) S ≤ G + 2dπS/grid,
    i.e. S ≤ G / (1 − 2dπ/grid): at most 11% above S for 3×3 kernels on the default grid."""
    if not isinstance(K, Tensor) or K.dim() != 4 or K.shape[0] != K.shape[1]:
        raise ValueError(f"the kernel K must be (C, C, k, k), got shape {tuple(getattr(K, 'shape', ()))}")
    slack = 1 - 2 * (K.shape[2] // 2) * math.pi / grid
    if slack <= 0:
        raise ValueError(f"grid={grid} is too coarse for a {K.shape[2]}×{K.shape[2]} kernel: it needs more than "
                         f"{2 * math.pi * (K.shape[2] // 2):.0f} frequencies per side")
    response = torch.fft.rfft2(K.detach().double(), s=(grid, grid)).permute(2, 3, 0, 1)
    return torch.linalg.matrix_norm(response, ord=2).max() / slack


def as_operator(W) -> Dense | Conv2d:
    """W as an operator: a tensor is [`Dense`][fprnn.core.operators.Dense]; an operator is itself."""
    return W if isinstance(W, (Dense, Conv2d)) else Dense(W)
