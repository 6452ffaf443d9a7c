"""A trained network on disk: a run directory's ``model.json`` (the constructor's arguments) and
``weights.pt`` (its state dict), or the network inside a training checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def network_state(checkpoint: dict) -> dict:
    """The network's state dict inside a training checkpoint (the module holds it as ``model``)."""
    return {k[len("model."):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("model.")}


def read_weights(source: Path, map_location="cpu") -> dict:
    """The state dict in ``source``: a ``weights.pt``, or a training checkpoint (``.ckpt``)."""
    if source.suffix == ".ckpt":
        return network_state(torch.load(source, map_location=map_location, weights_only=False))
    return torch.load(source, map_location=map_location)


def load_network(cls, path, map_location="cpu"):
    """``cls`` built from ``run_dir/model.json`` (its constructor's arguments) with the state dict
    of ``run_dir/weights.pt``, or of a checkpoint ``run_dir/checkpoints/*.ckpt`` given as ``path``."""
    path = Path(path)
    ckpt = path.suffix == ".ckpt"
    run_dir = path.parent.parent if ckpt else path
    source = path if ckpt else run_dir / "weights.pt"
    for f in (run_dir / "model.json", source):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found; {cls.__name__}.load needs a run directory with "
                                    f"model.json and weights.pt, or a checkpoint in its checkpoints/")
    net = cls(**json.loads((run_dir / "model.json").read_text()))
    weights = read_weights(source, map_location)
    wrong = state_mismatch(net.state_dict(), weights)
    if wrong:
        raise ValueError(f"{source}: {wrong} (built from model.json)")
    net.load_state_dict(weights)
    return net


def state_mismatch(mine: dict, weights: dict) -> str | None:
    """How saved ``weights`` (a state dict) fail to fit the state dict ``mine``, or None."""
    names = sorted(mine, key=lambda k: not k.startswith("layers."))    # the layers first, in order
    for name in [*names, *(k for k in weights if k not in mine)]:
        a, b = weights.get(name), mine.get(name)
        if a is None or b is None or a.shape != b.shape:
            return (f"has {name} of shape {None if a is None else tuple(a.shape)}, the model "
                    f"{None if b is None else tuple(b.shape)}")
    return None
