"""Several devices: every device skips a step if any faulted (and calls backward only if none
did: DDP's all-reduce runs inside it), weighs its loss so that DDP's average is the global batch's
mean, and checks now and then that the devices agree on the weights."""
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


def global_count(strategy, world: int, n_used: int, device) -> float:
    """The samples used on all devices: DDP averages each device's gradient, so each device's loss
    is its samples' sum over this count times the number of devices — the global batch's mean
    also when devices used different numbers of samples."""
    if world == 1:
        return float(n_used)
    return float(strategy.reduce(torch.tensor([float(n_used)], device=device), reduce_op="sum"))


def checksums(tensors: list[Tensor]) -> Tensor:
    """Three numbers per tensor that differ when the tensors differ (sum, sum of squares, an
    index-weighted sum)."""
    rows = []
    for t in tensors:
        t = t.detach().double().flatten()
        rows.append(torch.stack([t.sum(), (t * t).sum(),
                                 (t * torch.arange(t.numel(), dtype=t.dtype, device=t.device)).sum()]))
    return torch.cat(rows)


def check_ranks(module, batch_idx: int) -> None:
    """Every ``module.check_every`` steps and at each epoch's last batch, compare every trained
    tensor across devices (checksums); a mismatch stops the run with an error. Called inside the
    training step, so that every rank reaches the collective at the same point."""
    trainer = module.trainer
    last = batch_idx + 1 >= trainer.num_training_batches
    if module.world == 1 or not (last or (module.check_every and module.global_step % module.check_every == 0)):
        return
    c = checksums([t for _, t in module.model.named_parameters()])
    allc = module.all_gather(c)
    if not bool((allc == allc[0]).all()):
        raise RuntimeError(f"ranks disagree on the weights after step {module.global_step}: checksums "
                           f"{allc[:, 0].tolist()} — the devices are training different networks")
