"""Several devices: DDP all-reduces only the gradients autograd makes, so a hand-computed update
would silently stay per device. Every device skips a step if any faulted, applies the global
batch's mean of every trained tensor's update, and checks now and then that they agree."""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def sync_fault(strategy, world: int, fault: str | None, device) -> str | None:
    """The step's fault, or that of another device: a step is taken everywhere or nowhere."""
    if world == 1:
        return fault
    flag = strategy.reduce(torch.tensor([0.0 if fault is None else 1.0], device=device), reduce_op="sum")
    if fault is None and float(flag) > 0:
        return f"a fault on another device ({int(flag)} of {world})"
    return fault


def reduce_grads(strategy, world: int, grads: dict[str, Tensor], n_used: int,
                 already_global: set[str] = frozenset()) -> dict[str, Tensor]:
    """The global batch's mean of per-device means (``already_global``: left as they are).
    Each device's is weighted by its sample count, so the result is the global mean also when
    devices used different numbers of samples. One flat buffer, one all-reduce per step."""
    names = [n for n in grads if n not in already_global]
    if world == 1 or not names:
        return grads
    n = float(n_used)
    first = grads[names[0]]
    buf = torch.cat([(grads[k] * n).flatten() for k in names] + [first.new_tensor([n])])
    buf = strategy.reduce(buf, reduce_op="sum")
    out, at = dict(grads), 0
    for k in names:
        size = grads[k].numel()
        out[k] = (buf[at:at + size] / buf[-1]).reshape(grads[k].shape)
        at += size
    return out


def checksums(tensors: list[Tensor]) -> Tensor:
    """Three numbers per tensor that differ when the tensors differ (sum, sum of squares, an
    index-weighted sum)."""
    rows = []
    for t in tensors:
        t = t.detach().double().flatten()
        rows.append(torch.stack([t.sum(), (t * t).sum(),
                                 (t * torch.arange(t.numel(), dtype=t.dtype, device=t.device)).sum()]))
    return torch.cat(rows)
