"""Compose the project's Hydra config for tests, as `python train.py ...` would."""
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import fprnn.run  # noqa: F401  (registers the config resolvers)

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def make_cfg(overrides, run_dir=None, mnist=None):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        if run_dir is not None:
            cfg.run_dir = str(run_dir)
        if mnist is not None and cfg.data.get("root") is not None:
            cfg.data.root = str(mnist)
            cfg.data.download = False
    return cfg


QUICK_MNIST = ["progress_bar=false", "logger=csv", "data.train_subset=1024", "data.test_subset=500",
               "data.batch_size=256", "trainer.max_epochs=1"]
