"""Train a fixed-point RNN: `python train.py rule=w3 lr=0.25` (see conf/ and docs/)."""
import os
import sys

import hydra
from omegaconf import DictConfig

from fprnn.training.run import train

# what a user can get wrong (a config value, a data file, a checkpoint): one line, no traceback
USER_ERRORS = (ValueError, FileNotFoundError)


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        loss = train(cfg).get("test_loss")      # the objective of hyper-parameter searches
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        sys.exit(f"error: {e}\n(set HYDRA_FULL_ERROR=1 for the full traceback)")
    return float("inf") if loss is None else float(loss)


if __name__ == "__main__":
    main()
