import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def mnist_root() -> Path | None:
    """MNIST raw files for the tests: $FPRNN_DATA, else ../shared/data, else data/."""
    for cand in (os.environ.get("FPRNN_DATA"), ROOT.parent / "shared" / "data", ROOT / "data"):
        if cand and (Path(cand) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(cand).resolve()
    return None


@pytest.fixture
def mnist_dir():
    root = mnist_root()
    if root is None:
        pytest.skip("MNIST raw files not found (set FPRNN_DATA)")
    return root


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
