"""Front ends that map raw inputs to the first fixed-point layer's input s, trained by autograd
(the layer hands them the exact gradient, the implicit adjoint: fprnn.core.implicit).

An encoder is given by a spec (a dict, so that ``model.json`` can rebuild the network):
``{"kind": "none"}`` — the input itself — or ``{"kind": "conv", "in_shape": [C, H, W],
"channels": [c1, c2, …], "kernel": k}``: per channel count a block conv(k×k, same padding) → ReLU →
2×2 max-pool, then flattened.
"""
from __future__ import annotations

import math

import torch
from torch import nn

KINDS = ("none", "conv")


class ConvEncoder(nn.Module):
    """Flattened images (m, C·H·W) → conv blocks → (m, ``out_features``)."""

    def __init__(self, in_shape, channels=(16, 32), kernel: int = 5):
        super().__init__()
        if not (isinstance(in_shape, (list, tuple)) and len(in_shape) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in in_shape)):
            raise ValueError(f"encoder in_shape must be [channels, height, width] of positive integers, got {in_shape!r}")
        if not (isinstance(channels, (list, tuple)) and channels
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in channels)):
            raise ValueError(f"encoder channels must be a non-empty list of positive integers, got {channels!r}")
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"encoder kernel must be an odd positive integer (same padding), got {kernel!r}")
        c, h, w = in_shape
        if h >> len(channels) < 1 or w >> len(channels) < 1:
            raise ValueError(f"{len(channels)} pooling blocks halve {h}×{w} images to nothing: use fewer channels entries")
        self.in_shape = tuple(in_shape)
        blocks, prev = [], c
        for ch in channels:
            blocks += [nn.Conv2d(prev, ch, kernel, padding=kernel // 2), nn.ReLU(), nn.MaxPool2d(2)]
            prev = ch
        self.net = nn.Sequential(*blocks, nn.Flatten())
        self.out_features = prev * (h >> len(channels)) * (w >> len(channels))
        self.in_features = math.prod(in_shape)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.net(p.reshape(len(p), *self.in_shape))


def build_encoder(spec) -> ConvEncoder | None:
    """The encoder of a spec (see the module docstring); None for ``kind: none`` or no spec."""
    if spec is None:
        return None
    if not isinstance(spec, dict) or spec.get("kind", "none") not in KINDS:
        raise ValueError(f"encoder must be a dict with kind one of {list(KINDS)}, got {spec!r}")
    opts = {k: v for k, v in spec.items() if k != "kind"}
    if spec.get("kind", "none") == "none":
        if opts:
            raise ValueError(f"encoder kind 'none' takes no options, got {sorted(opts)}")
        return None
    allowed = {"in_shape", "channels", "kernel"}
    if set(opts) - allowed:
        raise ValueError(f"conv encoder has no option(s) {sorted(set(opts) - allowed)}; its options are {sorted(allowed)}")
    return ConvEncoder(**opts)
