"""Train a fixed-point RNN: `python train.py rule=w3 lr=0.25` (see conf/ and README)."""
import hydra
from omegaconf import DictConfig

from fprnn.run import train


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    loss = train(cfg).get("test_loss")      # the objective of hyper-parameter searches
    return float("inf") if loss is None else float(loss)


if __name__ == "__main__":
    main()
