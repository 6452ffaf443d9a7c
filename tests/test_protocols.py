"""Declared contracts: every network and data module that conf/ names offers what the training step,
the callbacks and the analysis call (fprnn.models.network, fprnn.data.protocol), its objective is
one fprnn.training.objectives has, and the checks find a planted violation."""
from pathlib import Path

import hydra
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from torch import nn

from fprnn.data import protocol
from fprnn.data.datamodules import ResumableData
from fprnn.models import network
from fprnn.models.conv import OneConvLayerNet
from fprnn.training.objectives import OBJECTIVES

CONF = Path(__file__).resolve().parents[1] / "conf"
#: what "auto" stands for when a network is built without its data
AUTO = {"n_in": 64, "n_out": 3, "in_shape": [1, 8, 8]}


#: a network whose config reads its data's (a network in time's dt)
WITH = {"ctrnn": ["data=neurogym"]}


def composed(group: str, name: str):
    with initialize_config_dir(str(CONF), version_base=None):
        return compose("train", overrides=[f"{group}={name}", *WITH.get(name, [])])[group]


def names(group: str) -> list[str]:
    return sorted(f.stem for f in (CONF / group).glob("*.yaml"))


def built_network(name: str):
    node = composed("model", name)
    return hydra.utils.instantiate(node, **{k: v for k, v in AUTO.items() if node.get(k) == "auto"})


@pytest.mark.parametrize("name", names("model"))
def test_every_configured_network_keeps_the_network_contract(name):
    net = built_network(name)
    base = network.TrialNetwork if name == "ctrnn" else network.StaticNetwork
    assert network.missing(net, base) == [], (name, type(net).__name__)
    assert net.config is not None and net.dtype == net.layers[0].W.dtype


@pytest.mark.parametrize("name", names("data"))
def test_every_configured_data_module_keeps_the_data_contract(name):
    target = composed("data", name)._target_
    cls = hydra.utils.get_class(target)
    assert protocol.missing(cls) == [], (name, target)
    assert cls.objective in OBJECTIVES, (name, cls.objective)


def test_the_network_check_names_what_a_planted_network_lacks():
    class NoReadouts(OneConvLayerNet):          # an abstract member left out: it cannot be built
        def __init__(self):
            super().__init__()

        def readins(self):
            return []

    with pytest.raises(TypeError, match="named_readouts"):
        NoReadouts()

    class Unsized(network.StaticNetwork):       # built, but n_out never set and a layer without sign
        def __init__(self):
            super().__init__()
            self.n_in, self.config = None, {}
            layer = nn.Module()
            layer.W, layer.mask, layer.report, layer.backward_rule = nn.Parameter(torch.zeros(2, 2)), None, None, None
            layer.constrained, layer.stability = False, lambda fp: fp
            self.layers = nn.ModuleList([layer])

        def set_backward(self, *a, **k):
            pass

        def readins(self):
            return []

        def named_readouts(self):
            return []

        used = None

        def fixed_points(self, p, solved=False):
            return []

    assert network.missing(Unsized()) == ["n_out", "layers.0.sign"]
    assert network.missing(Unsized(), network.TrialNetwork) == ["TrialNetwork"]


def test_the_data_check_names_what_a_planted_data_module_lacks():
    class Bare(pl.LightningDataModule):
        task = "classification"

    lacks = protocol.missing(Bare)
    assert "objective" in lacks and "n_in" in lacks and "probe_batch" in lacks and "task" not in lacks

    class Undeclared(ResumableData):            # a data module that gives no probe batch cannot be built
        n_in, n_out = 4, 3
    with pytest.raises(TypeError, match="probe_batch"):
        Undeclared()

    class Declared(Undeclared):
        def probe_batch(self, k=16):
            return torch.zeros(k, 4), torch.zeros(k, dtype=torch.long)
    assert protocol.missing(Declared) == [] and protocol.missing(Declared()) == []
    assert isinstance(Declared(), protocol.FixedPointData) and not isinstance(Bare(), protocol.FixedPointData)
