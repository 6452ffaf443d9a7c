"""A fully convolutional fixed-point network for maps of any size: maze inputs → a conv stem →
r∗ = f(K ⋆ r∗ + x) → a per-pixel head (``model=maze``, [`fprnn.data.mazes`][fprnn.data.mazes]).

    net = MazeNet(channels=32)
    logits = net(mazes)          # mazes (m, 3, H, W), any H, W → logits (m, 2, H, W)

Nothing in it has a size: the stem and head are convolutions, and the layer takes its maps' size
from each input (``ConvFixedPointLayer(size=None)``), so the kernel trained on small mazes runs
unchanged on larger ones; with ``iters_per_side`` the solve's budget grows with the map's side.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fprnn.core.checks import positive_int
from fprnn.models.conv import STEM_ACTIVATIONS, ConvFixedPointLayer, OneConvLayerNet
from fprnn.models.dense import get_dtype

Tensor = torch.Tensor


class MazeNet(OneConvLayerNet):
    """``in_channels`` input maps → stem (``stem_layers`` 3×3 convolutions with bias, ReLU between
    them; the last one's output is x) → the layer (``channels`` maps, ``kernel``, the layer's
    options) → head (a 1×1 convolution to ``head_channels`` maps and ReLU, with ``head_channels`` >
    0) → a 1×1 convolution to ``n_out`` classes per pixel. ``recurrent=False`` fixes K ≡ 0 (r = f(x):
    the same network without recurrence). Stem and head train by autograd (the read-in and read-out
    groups of [`fprnn.training.module.FixedPointModule`][fprnn.training.module.FixedPointModule]), K by the rule."""

    def __init__(self, in_channels: int = 3, n_out: int = 2, *, channels: int = 32, kernel: int = 3,
                 stem_layers: int = 2, head_channels: int = 32, stem_activation: str = "relu",
                 recurrent: bool = True, seed: int = 0, dtype: Any = "float32", n_in: None = None,
                 **layer_options):
        super().__init__()
        if n_in is not None:
            raise ValueError(f"a MazeNet takes maps of any size: n_in must be null, got {n_in!r}")
        if stem_activation not in STEM_ACTIVATIONS:
            raise ValueError(f"unknown stem_activation {stem_activation!r}; choose one of {sorted(STEM_ACTIVATIONS)}")
        self.in_channels, self.n_out = positive_int("in_channels", in_channels), positive_int("n_out", n_out)
        C, layers = positive_int("channels", channels), positive_int("stem_layers", stem_layers)
        if isinstance(head_channels, bool) or not isinstance(head_channels, int) or head_channels < 0:
            raise ValueError(f"head_channels must be a non-negative integer, got {head_channels!r}")
        self.n_in = None
        dt = get_dtype(dtype)
        with torch.random.fork_rng(devices=[]):     # the stem's and head's init (torch's defaults), seeded
            torch.manual_seed(int(seed))
            stem: list[nn.Module] = []
            for i in range(layers):
                stem += [nn.Conv2d(in_channels if i == 0 else C, C, 3, padding=1)]
                if i < layers - 1:
                    stem.append(STEM_ACTIVATIONS[stem_activation]())
            self.stem = nn.Sequential(*stem).to(dt)
            head: list[nn.Module] = [nn.Conv2d(C, head_channels, 1), nn.ReLU()] if head_channels else []
            head.append(nn.Conv2d(head_channels or C, n_out, 1))
            self.head = nn.Sequential(*head).to(dt)
        layer = ConvFixedPointLayer(C, None, kernel, seed=seed, dtype=dtype, **layer_options)
        if not recurrent:
            layer.W.requires_grad_(False).zero_()
        self.layers = nn.ModuleList([layer])
        self.config = dict(in_channels=in_channels, n_out=n_out, channels=C, kernel=kernel, stem_layers=layers,
                           head_channels=head_channels, stem_activation=stem_activation, recurrent=recurrent,
                           seed=seed, dtype=str(dtype), **layer_options)

    def readins(self) -> list[Tensor]:
        return list(self.stem.parameters())

    def named_readouts(self) -> list[tuple[str, Tensor]]:
        return [(f"head.{n}", t) for n, t in self.head.named_parameters()]

    def features(self, p: Tensor) -> Tensor:
        """x: the stem's maps for input maps p (m, in_channels, H, W)."""
        if p.dim() != 4 or p.shape[1] != self.in_channels:
            raise ValueError(f"MazeNet input must be maps (m, {self.in_channels}, H, W), got shape {tuple(p.shape)}")
        return self.stem(p.to(self.dtype))

    def forward(self, p: Tensor, u0: Tensor | None = None, budget: dict | None = None) -> Tensor:
        """Logits (m, n_out, H, W) for maps p (m, in_channels, H, W); the layer solved from u0 (maps,
        rest by default) with ``budget`` (the layer's own by default,
        [`ConvFixedPointLayer.fixed_point`][fprnn.models.conv.ConvFixedPointLayer.fixed_point])."""
        return self.head(self.layer(self.features(p), u0, budget))

    def progressive(self, p: Tensor, n: int, k: int) -> Tensor:
        """Logits after n iterations of the layer from rest without a graph and k with one
        ([`ConvFixedPointLayer.progressive`][fprnn.models.conv.ConvFixedPointLayer.progressive])."""
        return self.head(self.layer.progressive(self.features(p), n, k))
