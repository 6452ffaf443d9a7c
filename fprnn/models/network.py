"""What a network offers the rest of fprnn: the training step, the callbacks, the analysis and a
run's saved files call these, and nothing else.

- [`FixedPointNetwork`][fprnn.models.network.FixedPointNetwork]: every network. Its ``layers`` (each
  a [`RecurrentLayer`][fprnn.models.network.RecurrentLayer]), sizes, the rule as its backward, the
  loss normalisation w2 needs, the read-in and read-out parameter groups, its configuration
  (``config``: the constructor's arguments, saved as ``model.json``) and ``load``.
- [`StaticNetwork`][fprnn.models.network.StaticNetwork]: a network of one input → fixed points →
  output (``FixedPointRNN``, the conv nets): the samples the last call used, the fixed points of
  inputs.
- [`TrialNetwork`][fprnn.models.network.TrialNetwork]: a network in time (``TrialRNN``): how the last
  call's trials started.

A new network subclasses one of these and implements what is abstract; what has a default
(``scale_to_stable``, ``multistable``) it overrides where it can do it. ``missing`` names what a
network leaves out (the protocol test runs it on every network ``conf/`` names).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from fprnn.models.saved import load_network

Tensor = torch.Tensor


@runtime_checkable
class RecurrentLayer(Protocol):
    """A recurrent layer as the step sees it: W (the tensor the rule moves), its constraints
    (``sign``, ``mask`` and ``constraint`` for E/I layers; ``constrained`` False and the rest None
    for a layer without any), the last call's ``report`` (fixed point, samples used, fault, the
    per-sample error δ; None before the first call) and its ``backward_rule``; the stability value of a fixed point."""
    W: Tensor
    sign: Tensor | None
    mask: Tensor | None
    report: Any
    backward_rule: Any

    @property
    def constrained(self) -> bool: ...

    def stability(self, fp) -> Tensor: ...


class FixedPointNetwork(nn.Module, ABC):
    """Every network: ``layers`` (an ``nn.ModuleList`` of recurrent layers), ``n_in`` and ``n_out``
    (None where the input feeds x directly or r itself is the output), ``config`` (the arguments
    that rebuild it)."""
    layers: nn.ModuleList
    n_in: int | None
    n_out: int | None
    config: dict | None

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].W.dtype

    @classmethod
    def load(cls, path, map_location="cpu"):
        """The trained network of a run: ``run_dir/model.json`` (the constructor's arguments) and
        ``run_dir/weights.pt``, or a checkpoint ``run_dir/checkpoints/*.ckpt``
        ([`load_network`][fprnn.models.saved.load_network]: a tensor that does not fit is named)."""
        return load_network(cls, path, map_location)

    @abstractmethod
    def set_backward(self, rule: str = "w3", eta: float = 1.0, rule_kwargs: Any = None, **options) -> None:
        """The rule each layer's backward applies, with η and
        [`fprnn.core.implicit.RuleBackward`][fprnn.core.implicit.RuleBackward]'s options."""

    def set_loss_norm(self, n: float | None) -> None:
        """The n of the loss Σ L_i / n that the next backward differentiates (w2 needs it: see
        [`fprnn.core.implicit`][fprnn.core.implicit]); read at backward, so it may be set after the forward call — e.g. to
        the count of ``used`` samples a loss is averaged over."""
        for layer in self.layers:
            layer.set_loss_norm(n)

    @abstractmethod
    def readins(self) -> list[Tensor]:
        """The trained tensors before the recurrent layers (read-ins, a stem, an encoder)."""

    @abstractmethod
    def named_readouts(self) -> list[tuple[str, Tensor]]:
        """The trained tensors after them (read-outs, a head), by name."""

    def scale_to_stable(self, p: Tensor, target: float = 0.9) -> float:
        """Scale W down until the fixed points of inputs p are stable below ``target``; returns the
        scale. A network without a dense W to scale refuses."""
        raise ValueError(f"stable_init scales a dense W; {type(self).__name__} has none to scale: "
                         f"set stable_init=null")


class StaticNetwork(FixedPointNetwork):
    """One input → the layers' fixed points → an output: ``forward(p)``; ``used`` (the samples of
    the last call whose solve converged in every layer), ``fixed_points(p)``."""

    @property
    @abstractmethod
    def used(self) -> Tensor:
        """Per input of the last call: its fixed point converged in every layer."""

    @abstractmethod
    def fixed_points(self, p: Tensor, solved: bool = False) -> list:
        """Every layer's fixed point for inputs p (no graph)."""

    def multistable(self, p: Tensor) -> Tensor | None:
        """Per input, whether the solver's fixed point is another than the one the dynamics reach;
        None where the network does not measure it."""
        return None


class TrialNetwork(FixedPointNetwork):
    """A network in time: ``forward(ob, static)`` gives the outputs at every step; ``report`` how the
    last call's trials started; ``start`` how a trial starts; ``layer`` its one recurrent layer."""
    start: str
    report: Any

    @property
    def layer(self):
        return self.layers[0]


def missing(net, base: type = FixedPointNetwork) -> list[str]:
    """What the network ``net`` leaves out of ``base``'s contract: ``base`` itself when it is not one,
    else the declared attributes it lacks, and every layer that is not a
    [`RecurrentLayer`][fprnn.models.network.RecurrentLayer] (with the members it lacks). An abstract
    member left unimplemented already stops the network from being built."""
    if not isinstance(net, base):
        return [base.__name__]
    declared = {name for k in type(net).__mro__ if issubclass(k, FixedPointNetwork) or k is base
                for name in getattr(k, "__annotations__", {}) if k.__module__ == __name__}
    out = sorted(name for name in declared if not hasattr(net, name))
    for l, layer in enumerate(getattr(net, "layers", [])):
        lacks = [name for name in ("W", "sign", "mask", "report", "backward_rule", "constrained", "stability")
                 if not hasattr(layer, name)]
        out += [f"layers.{l}.{name}" for name in lacks]
    return out
