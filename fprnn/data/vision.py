"""Image data sets through torchvision (MNIST, Fashion-MNIST, KMNIST, CIFAR-10) as flat tensors.

torchvision reads the raw files; what it returns is checked (shapes, counts, labels), and when
it fails or returns something wrong the raw files are examined — magic number, dimensions and
size of the IDX files, shape of the CIFAR pickles — so that a truncated or corrupted download
ends in an error that names the file and what is wrong, not in a reshape error deep inside
torchvision. Good files are read once, by torchvision alone.
"""
from __future__ import annotations

import math
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")


@dataclass(frozen=True)
class VisionSet:
    name: str             # the config's name (data=<name>)
    torchvision: str      # the torchvision class that reads (and downloads) it
    folder: str           # where its raw files lie, relative to data.root
    files: tuple[str, ...]
    shape: tuple[int, int, int]   # (channels, height, width)
    n_classes: int = 10

    def n_in(self, grayscale: bool) -> int:
        c, h, w = self.shape
        return (1 if grayscale else c) * h * w


SETS = {s.name: s for s in (
    VisionSet("mnist", "MNIST", "MNIST/raw", _IDX_FILES, (1, 28, 28)),
    VisionSet("fashion_mnist", "FashionMNIST", "FashionMNIST/raw", _IDX_FILES, (1, 28, 28)),
    VisionSet("kmnist", "KMNIST", "KMNIST/raw", _IDX_FILES, (1, 28, 28)),
    VisionSet("cifar10", "CIFAR10", "cifar-10-batches-py", _CIFAR_FILES, (3, 32, 32)),
)}


def get_set(name: str) -> VisionSet:
    try:
        return SETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(SETS)}") from None


class CorruptDataError(ValueError):
    """A data file that exists but is not what it should be."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"{path}: {what}. The file is damaged or not the right one: delete it and "
                         f"download again (data.download=true), or copy a good one there.")


def missing_files(spec: VisionSet, root: str | Path) -> list[Path]:
    raw = Path(root) / spec.folder
    return [raw / f for f in spec.files if not (raw / f).exists()]


def ensure(spec: VisionSet, root: str | Path, download: bool = True) -> Path:
    """Make sure the set's raw files are under ``root/<folder>``. A download goes to a temporary
    folder first, so a failed one leaves nothing behind; failure says what to put where."""
    root = Path(root).expanduser().resolve()
    missing = missing_files(spec, root)
    if not missing:
        return root
    reason = "downloads are off (data.download=false)"
    if download:
        import torchvision.datasets as tvd
        tmp = Path(tempfile.mkdtemp(prefix=f"fprnn-{spec.name}-"))
        try:
            for train in (True, False):
                getattr(tvd, spec.torchvision)(str(tmp), train=train, download=True)
            (root / spec.folder).mkdir(parents=True, exist_ok=True)
            for f in spec.files:
                dst = root / spec.folder / f
                if not dst.exists():
                    shutil.move(str(tmp / spec.folder / f), dst)
            return root
        except Exception as e:  # no network, server down, ...
            first = str(e).splitlines()[0][:200] if str(e) else ""
            reason = f"the download failed ({type(e).__name__}: {first})"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    raise FileNotFoundError(
        f"{spec.torchvision} not found and {reason}. Expected the files {', '.join(spec.files)} in "
        f"{root / spec.folder} (missing: {', '.join(p.name for p in missing)}). Put them there "
        f"(uncompressed), or point data.root at the folder that holds {spec.folder}/, e.g. "
        f"`python train.py data.root=/path/to/data`.")


# -- checks of the raw files ------------------------------------------------------------
def check_idx(path: Path, dims: tuple[int, ...], n_classes: int | None = None) -> int:
    """An IDX file of unsigned bytes with ``len(dims) + 1`` dimensions, (n, *dims); returns n.
    Labels (``dims == ()``) must lie in [0, n_classes)."""
    ndim = len(dims) + 1
    size = path.stat().st_size
    head = 4 + 4 * ndim
    with path.open("rb") as fh:
        header = fh.read(head)
    if len(header) < 4:
        raise CorruptDataError(path, f"{size} bytes, too short to be an IDX file")
    magic, want = int.from_bytes(header[:4], "big"), 0x0800 | ndim   # 0x08: unsigned bytes
    if magic != want:
        kind = "image" if dims else "label"
        raise CorruptDataError(path, f"magic number {magic:#010x}, expected {want:#010x} for an IDX "
                                     f"{kind} file of unsigned bytes with {ndim} dimension(s)")
    if len(header) < head:
        raise CorruptDataError(path, f"{size} bytes, too short for its {ndim}-dimensional header")
    shape = tuple(int.from_bytes(header[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    if tuple(shape[1:]) != tuple(dims):
        raise CorruptDataError(path, f"items of shape {shape[1:]}, expected {tuple(dims)}")
    need = head + shape[0] * math.prod(dims)
    if size != need:
        raise CorruptDataError(path, f"{size} bytes, but its header announces {shape[0]} items of shape "
                                     f"{tuple(dims)} ({need} bytes): the file is truncated or padded")
    if n_classes is not None:
        labels = torch.frombuffer(bytearray(path.read_bytes()[head:]), dtype=torch.uint8)
        if labels.numel() and int(labels.max()) >= n_classes:
            raise CorruptDataError(path, f"label {int(labels.max())} found, expected labels in "
                                         f"[0, {n_classes})")
    return shape[0]


def _check_idx_pair(spec: VisionSet, raw: Path, split: str) -> None:
    n_img = check_idx(raw / f"{split}-images-idx3-ubyte", spec.shape[1:])
    n_lab = check_idx(raw / f"{split}-labels-idx1-ubyte", (), spec.n_classes)
    if n_img != n_lab:
        raise CorruptDataError(raw / f"{split}-labels-idx1-ubyte",
                               f"{n_lab} labels for the {n_img} images of {split}-images-idx3-ubyte")


def _check_cifar_batch(path: Path, spec: VisionSet) -> None:
    try:
        with path.open("rb") as fh:
            d = pickle.load(fh, encoding="latin1")
        data, labels = d["data"], d.get("labels", d.get("fine_labels"))
    except Exception as e:
        raise CorruptDataError(path, f"not a CIFAR batch (reading it failed: {type(e).__name__})") from None
    want = spec.n_in(grayscale=False)
    shape = tuple(getattr(data, "shape", ()))
    if len(shape) != 2 or shape[1] != want or labels is None or len(labels) != shape[0]:
        raise CorruptDataError(path, f"data of shape {shape} with {None if labels is None else len(labels)} "
                                     f"labels, expected (n, {want}) with n labels")
    if len(labels) and not 0 <= min(labels) <= max(labels) < spec.n_classes:
        raise CorruptDataError(path, f"labels in [{min(labels)}, {max(labels)}], expected [0, {spec.n_classes})")


def check_files(spec: VisionSet, root: Path) -> None:
    """Raise [`CorruptDataError`][fprnn.data.vision.CorruptDataError] for the first raw file that is not what it should be."""
    raw = root / spec.folder
    if spec.files == _IDX_FILES:
        for split in ("train", "t10k"):
            _check_idx_pair(spec, raw, split)
    else:
        for f in spec.files[:-1]:
            _check_cifar_batch(raw / f, spec)


# -- loading ----------------------------------------------------------------------------
def _torchvision_class(spec: VisionSet):
    import torchvision.datasets as tvd
    cls = getattr(tvd, spec.torchvision)
    if spec.torchvision != "CIFAR10":
        return cls

    class CheckedCIFAR10(cls):
        # what it reads is checked in `load` (shapes and labels); torchvision's md5 check would
        # also refuse any copy that is not byte for byte the release, e.g. a re-pickled one
        train_list = [[f, None] for f, _ in cls.train_list]
        test_list = [[f, None] for f, _ in cls.test_list]
        meta = {**cls.meta, "md5": None}

    return CheckedCIFAR10


def load(name: str, root: str | Path, train: bool, download: bool = True, grayscale: bool = False,
         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (n, C·H·W) scaled to [0, 1], channels first, labels (n,)) of the train or test
    split. ``grayscale`` maps colour images to luminance (ITU-R 601, as PIL's "L")."""
    spec = get_set(name)
    root = ensure(spec, root, download)
    try:
        ds = _torchvision_class(spec)(str(root), train=train, download=False)
        x = torch.as_tensor(ds.data)
        y = torch.as_tensor(ds.targets).long().clone()
    except Exception:
        check_files(spec, root)            # names the damaged file; else torchvision's error stands
        raise
    x = x.permute(0, 3, 1, 2) if x.dim() == 4 else x.unsqueeze(1)   # CIFAR: (n, H, W, C); MNIST: (n, H, W)
    labels_ok = not len(y) or 0 <= int(y.min()) <= int(y.max()) < spec.n_classes
    if tuple(x.shape[1:]) != spec.shape or len(x) != len(y) or not labels_ok:
        check_files(spec, root)
        raise CorruptDataError(root / spec.folder, f"read as {len(x)} images of shape {tuple(x.shape[1:])} with "
                                                   f"{len(y)} labels, expected shape {spec.shape} and labels in "
                                                   f"[0, {spec.n_classes})")
    x = x.to(dtype) / 255.0
    if grayscale and x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114], dtype=dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return x.reshape(len(x), -1), y
