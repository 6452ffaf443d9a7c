"""What a data module offers the rest of fprnn, beside Lightning's data loaders: what the training
run ([`fprnn.training.run`][fprnn.training.run]) reads of any data module. The objective a data module
names ([`fprnn.training.objectives`][fprnn.training.objectives]) reads its batches and may ask more of
the data it serves: trials their ``condition_keys`` and ``trial_info``, mazes their sizes and
counts, an E/I fit the static test set.

[`ResumableData`][fprnn.data.datamodules.ResumableData] declares every member with the default of a
static problem; a new data module subclasses it and sets what differs. ``missing`` names what a
data module lacks (the protocol test runs it on every data module ``conf/`` names).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class FixedPointData(Protocol):
    """``task``: classification | regression (what the targets are); ``objective``: the name of
    its objective (static | mazes | trials); ``name``; sizes ``n_in``, ``n_out`` (None: x fed
    directly, r itself the target) and ``N`` (the dimension of direct data); ``units`` (recorded
    units whose rates are the targets), ``image_shape`` (for conv read-ins and encoders),
    ``targets`` (a network in time's: actions | continuous); ``note`` (a warning the run prints),
    ``teacher`` (a network that made the data); ``val_on_test``, ``val_size`` and ``validation``
    (which split validation runs on, and what it is); ``probe_batch(k)``: k training inputs and
    targets; ``weights_loss(model)``: the task's loss in closed form of W, or None; ``state_dict``
    and ``load_state_dict``: where an epoch stood (resume)."""
    task: str
    objective: str
    name: str | None
    n_in: int | None
    n_out: int | None
    N: int | None
    units: torch.Tensor | None
    image_shape: tuple[int, int, int] | None
    targets: str | None
    note: str | None
    teacher: Any
    val_on_test: bool
    val_size: int
    validation: str | None

    def probe_batch(self, k: int = 16) -> tuple[torch.Tensor, Any]: ...

    def weights_loss(self, model) -> dict[str, float] | None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def members(protocol: type = FixedPointData) -> list[str]:
    """The names ``protocol`` declares: its attributes and its methods."""
    names = set(getattr(protocol, "__annotations__", {}))
    names |= {n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")}
    return sorted(names)


def missing(data, protocol: type = FixedPointData) -> list[str]:
    """The members of ``protocol`` that the data module (a class or an instance) lacks."""
    return [name for name in members(protocol) if not hasattr(data, name)]
