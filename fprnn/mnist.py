"""MNIST as flat tensors in [0, 1] (section 3.2), read by torchvision from ``root/MNIST/raw``."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
             "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def missing_files(root: str | Path) -> list[Path]:
    raw = Path(root) / "MNIST" / "raw"
    return [raw / f for f in RAW_FILES if not (raw / f).exists()]


def ensure_mnist(root: str | Path, download: bool = True) -> Path:
    """Make sure the four IDX files are under ``root/MNIST/raw``. A download goes to a temporary
    folder first, so a failed one leaves nothing behind; failure says what to put where."""
    root = Path(root).expanduser().resolve()
    missing = missing_files(root)
    if not missing:
        return root
    reason = "downloads are off (data.download=false)"
    if download:
        from torchvision.datasets import MNIST
        tmp = Path(tempfile.mkdtemp(prefix="fprnn-mnist-"))
        try:
            MNIST(str(tmp), train=True, download=True)
            MNIST(str(tmp), train=False, download=True)
            (root / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
            for f in RAW_FILES:
                dst = root / "MNIST" / "raw" / f
                if not dst.exists():
                    shutil.move(str(tmp / "MNIST" / "raw" / f), dst)
            return root
        except Exception as e:  # no network, server down, ...
            reason = f"the download failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise FileNotFoundError(
        f"MNIST not found and {reason}. Expected the four IDX files "
        f"{', '.join(RAW_FILES)} in {root / 'MNIST' / 'raw'} (missing: "
        f"{', '.join(p.name for p in missing)}). Put them there (gunzipped), or point "
        f"data.root at the folder that holds MNIST/raw/, e.g. `python train.py data.root=/path/to/data`.")


def load_mnist(root: str | Path, train: bool, download: bool = True,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, 784) scaled to [0, 1], labels (n,)) of the train or test split."""
    from torchvision.datasets import MNIST
    root = ensure_mnist(root, download)
    ds = MNIST(str(root), train=train, download=False)
    return ds.data.reshape(len(ds.data), -1).to(dtype) / 255.0, ds.targets.clone()
