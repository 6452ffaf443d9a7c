"""Data sets: the torchvision family from files in their real formats, the validation split,
users' own arrays, damaged files, and the config every logger receives."""
import json
import pickle
import re

import numpy as np
import pytest
import torch

from fprnn.data import vision
from fprnn.data.datamodules import ArraysDataModule, VisionDataModule
from fprnn.training.run import build, train

from helpers import QUICK_MNIST, make_cfg, wandb_offline_config


def write_idx(path, arr: np.ndarray) -> None:
    """An IDX file of unsigned bytes, as in the MNIST releases."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (0x0800 | arr.ndim).to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def write_mnist_like(root, folder, n_train=30, n_test=12, seed=0):
    g = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = g.integers(0, 256, (n, 28, 28)), g.integers(0, 10, n)
        write_idx(root / folder / "raw" / f"{split}-images-idx3-ubyte", x)
        write_idx(root / folder / "raw" / f"{split}-labels-idx1-ubyte", y)
        out[split] = (x, y)
    return out


def write_cifar(root, n=8, seed=0):
    g = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    out = {"train": [], "test": []}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x, y = g.integers(0, 256, (n, 3072), dtype=np.uint8), g.integers(0, 10, n).tolist()
        with open(d / name, "wb") as fh:
            pickle.dump({"data": x, "labels": y}, fh)
        out["test" if name == "test_batch" else "train"].append((x, y))
    with open(d / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    return out


@pytest.mark.parametrize("name,folder", [("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_mnist_family_loads_through_torchvision(tmp_path, name, folder):
    written = write_mnist_like(tmp_path, folder)
    for split, train_ in (("train", True), ("t10k", False)):
        x, y = vision.load(name, tmp_path, train=train_, download=False)
        ref_x, ref_y = written[split]
        assert x.shape == (len(ref_y), 784) and x.dtype == torch.float32
        assert torch.equal(x, torch.tensor(ref_x.reshape(len(ref_y), -1), dtype=torch.float32) / 255)
        assert torch.equal(y, torch.tensor(ref_y))


def test_cifar10_loads_through_torchvision_in_colour_and_grayscale(tmp_path):
    written = write_cifar(tmp_path)
    x, y = vision.load("cifar10", tmp_path, train=True, download=False)
    ref = np.concatenate([b[0] for b in written["train"]])      # rows are R plane, G plane, B plane
    assert x.shape == (40, 3072)
    assert torch.allclose(x, torch.tensor(ref, dtype=torch.float32) / 255)
    assert y.tolist() == sum((b[1] for b in written["train"]), [])
    g, _ = vision.load("cifar10", tmp_path, train=False, download=False, grayscale=True)
    rgb = torch.tensor(written["test"][0][0], dtype=torch.float64).reshape(8, 3, 1024) / 255
    lum = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert g.shape == (8, 1024) and torch.allclose(g.double(), lum, atol=1e-6)
    dm = VisionDataModule("cifar10", root=str(tmp_path), download=False, grayscale=True, val_size=0)
    assert (dm.n_in, dm.n_out) == (1024, 10)


def test_missing_files_name_the_folder_for_each_set(tmp_path):
    for name, folder, f in (("kmnist", "KMNIST/raw", "t10k-labels-idx1-ubyte"),
                            ("cifar10", "cifar-10-batches-py", "data_batch_3")):
        with pytest.raises(FileNotFoundError) as e:
            vision.ensure(vision.get_set(name), tmp_path, download=False)
        assert str(tmp_path / folder) in str(e.value) and f in str(e.value)


@pytest.mark.parametrize("damage,message", [
    ("truncate", r"train-images-idx3-ubyte: \d+ bytes, but its header announces 30 items of shape "
                 r"\(28, 28\) \(23536 bytes\): the file is truncated"),
    ("magic", r"train-images-idx3-ubyte: magic number 0x00000802, expected 0x00000803 for an IDX image"),
    ("random", r"train-labels-idx1-ubyte: magic number 0x[0-9a-f]{8}, expected 0x00000801 for an IDX label"),
    ("labels", r"t10k-labels-idx1-ubyte: label 200 found, expected labels in \[0, 10\)"),
    ("count", r"t10k-labels-idx1-ubyte: 11 labels for the 12 images"),
])
def test_damaged_idx_files_get_a_message_that_names_them(tmp_path, damage, message):
    write_mnist_like(tmp_path, "MNIST")
    raw = tmp_path / "MNIST" / "raw"
    img, lab = raw / "train-images-idx3-ubyte", raw / "train-labels-idx1-ubyte"
    if damage == "truncate":
        img.write_bytes(img.read_bytes()[:5000])
    elif damage == "magic":
        img.write_bytes(bytes.fromhex("00000802") + img.read_bytes()[4:])
    elif damage == "random":
        lab.write_bytes(np.random.default_rng(1).integers(0, 256, 64, dtype=np.uint8).tobytes())
    elif damage == "labels":
        write_idx(raw / "t10k-labels-idx1-ubyte", np.full(12, 200))
    else:
        write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(11))
    with pytest.raises(ValueError, match=message) as e:
        VisionDataModule(root=str(tmp_path), download=False).setup()
    assert str(raw) in str(e.value) and "download again" in str(e.value)


def test_damaged_cifar_batch_is_named(tmp_path):
    write_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"{bad}: not a CIFAR batch")):
        vision.load("cifar10", tmp_path, train=True, download=False)


def test_validation_split_is_disjoint_and_drawn_by_the_seed(mnist_dir):
    def split(seed, val_size=5000):
        dm = VisionDataModule(root=str(mnist_dir), download=False, val_size=val_size, seed=seed)
        dm.setup()
        return dm
    a, b, c = split(0), split(0), split(1)
    assert len(a.val_idx) == 5000 and len(a.train_idx) == 55000
    assert not set(a.val_idx.tolist()) & set(a.train_idx.tolist())
    assert sorted(a.val_idx.tolist() + a.train_idx.tolist()) == list(range(60000))
    assert torch.equal(a.val_idx, b.val_idx) and not torch.equal(a.val_idx, c.val_idx)
    full = vision.load("mnist", mnist_dir, train=True, download=False)[0]
    assert torch.equal(a.val_set.tensors[0], full[a.val_idx]) and torch.equal(a.train_set.tensors[0], full[a.train_idx])
    assert len(split(0, 0.1).val_idx) == 6000
    assert split(0, 0).val_set is None and torch.equal(split(0, 0).train_idx, torch.arange(60000))
    with pytest.raises(ValueError, match=r"val_size=60000 takes 60000 of the 60000 samples and leaves none"):
        split(0, 60000)
    with pytest.raises(ValueError, match=r"val_size must be a count .* got -1"):
        VisionDataModule(val_size=-1)


def _moved(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """img moved down dy and right dx pixels, the vacated border zero (numpy, by slicing)."""
    out = np.zeros_like(img)
    h, w = img.shape
    out[max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)] = img[max(-dy, 0): h - max(dy, 0),
                                                                     max(-dx, 0): w - max(dx, 0)]
    return out


def test_augmentation_flips_and_shifts_each_training_image_by_draws_of_seed_and_epoch(tmp_path):
    written = write_mnist_like(tmp_path, "FashionMNIST", n_train=40)
    images = (torch.tensor(written["train"][0], dtype=torch.float32) / 255).numpy()

    def epoch_of(seed, epoch, resume=None):
        dm = VisionDataModule("fashion_mnist", root=str(tmp_path), download=False, val_size=8, seed=seed,
                              batch_size=4, flip=True, shift=3)
        dm.setup()
        if resume is not None:
            dm.load_state_dict(resume)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        order = torch.tensor(list(loader.sampler))
        x = torch.cat([b[0] for b in loader])
        return dm, loader.dataset, order, x

    dm, ds, order, x = epoch_of(seed=1, epoch=2)
    assert x.shape == (32, 784)
    for k, i in enumerate(order.tolist()):
        ref = images[dm.train_idx[i]]
        if ds._flips[i]:
            ref = ref[:, ::-1]
        ref = _moved(ref, *ds._moves[i].tolist())
        np.testing.assert_array_equal(x[k].view(28, 28).numpy(), ref)
    assert 0 < int(ds._flips.sum()) < 32 and ds._moves.abs().max() == 3 and ds._moves.abs().min() == 0
    # the draws are (seed, epoch)'s: a rebuilt run repeats them, the next epoch draws anew
    assert torch.equal(epoch_of(seed=1, epoch=2)[3], x)
    assert not torch.equal(epoch_of(seed=1, epoch=3)[3], x)
    # a run resumed after 3 batches of that epoch sees the images it had not seen, augmented alike
    assert torch.equal(epoch_of(seed=1, epoch=2, resume={"epoch": 2, "batches_done": 3})[3], x[12:])
    # validation and test images are the files' own
    val = torch.cat([b[0] for b in dm.val_dataloader()])
    assert torch.equal(val, torch.tensor(images[dm.val_idx.numpy()].reshape(8, -1)))
    test = torch.cat([b[0] for b in dm.test_dataloader()])
    assert torch.equal(test, torch.tensor(written["t10k"][0].reshape(12, -1), dtype=torch.float32) / 255)


@pytest.mark.parametrize("kw,message", [
    (dict(shift=28), r"shift must be a whole number of pixels in \[0, 28\) for mnist, got 28"),
    (dict(shift=-1), r"shift .* got -1"),
    (dict(shift=1.5), r"shift .* got 1.5"),
    (dict(flip="yes"), r"flip must be true or false, got 'yes'"),
])
def test_bad_augmentation_is_named(kw, message):
    with pytest.raises(ValueError, match=message):
        VisionDataModule(**kw)


def test_test_set_is_read_only_by_trainer_test(tmp_path, mnist_dir):
    cfg = make_cfg([*QUICK_MNIST, "data.val_size=300", "trainer.max_epochs=2"], tmp_path, mnist_dir)
    data, model, module, trainer = build(cfg, tmp_path)
    calls = []
    for name in ("val_dataloader", "test_dataloader"):
        orig = getattr(data, name)
        setattr(data, name, lambda orig=orig, name=name: (calls.append((name, trainer.state.fn.value)), orig())[1])
    trainer.fit(module, datamodule=data)
    val_batches = trainer.num_val_batches[0]
    trainer.test(module, datamodule=data, verbose=False)
    assert ("test_dataloader", "test") in calls
    assert all(fn == "test" for name, fn in calls if name == "test_dataloader")
    assert all(fn == "fit" for name, fn in calls if name == "val_dataloader")
    assert data.val_dataloader().dataset is data.val_set and val_batches == 1 and len(data.val_set) == 300


def _classification_file(path, n=1200, d=10, C=3, seed=0):
    g = np.random.default_rng(seed)
    y = g.integers(0, C, n)
    X = 2 * g.normal(size=(C, d))[y] + g.normal(size=(n, d))
    np.savez(path, X=X, y=y)
    return X, y


def _first_and_test_loss(run_dir, res):
    """The first step's training loss and the last network's test loss (a run with a validation
    split reports the best-validation network's as test_loss, the last one's as last_test_loss)."""
    import csv
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return float(next(r["train/loss_step"] for r in rows if r.get("train/loss_step"))), \
        res.get("last_test_loss", res["test_loss"])


def test_arrays_learn_a_classification_and_a_regression_task(tmp_path):
    X, y = _classification_file(tmp_path / "cls.npz")
    common = ["data=arrays", "progress_bar=false", "logger=csv", "model.layers=[100]", "rule=w3", "data.normalize=true"]
    res = train(make_cfg([*common, f"data.path={tmp_path / 'cls.npz'}", "lr=0.25", "trainer.max_epochs=5"],
                         tmp_path / "cls"))
    first, last = _first_and_test_loss(tmp_path / "cls", res)
    assert res["status"] == "finished" and res["task"] == "classification" and last < first / 10
    assert res["test_acc"] > 0.95
    A = np.random.default_rng(1).normal(size=(10, 2)) / np.sqrt(10)
    torch.save({"X": torch.tensor(X), "Y": torch.tensor(np.tanh(X @ A))}, tmp_path / "reg.pt")
    res = train(make_cfg([*common, f"data.path={tmp_path / 'reg.pt'}", "lr=0.05", "trainer.max_epochs=50"],
                         tmp_path / "reg"))
    first, last = _first_and_test_loss(tmp_path / "reg", res)
    assert res["status"] == "finished" and res["task"] == "regression" and last < first / 10


def test_arrays_splits_and_normalization(tmp_path):
    X, y = _classification_file(tmp_path / "a.npz", n=100)
    dm = ArraysDataModule(str(tmp_path / "a.npz"), test_size=0.2, val_size=10, normalize=True)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (70, 10, 20)
    assert (dm.n_in, dm.n_out, dm.task) == (10, 3, "classification")
    x = dm.train_set.tensors[0]
    assert torch.allclose(x.mean(0), torch.zeros(10), atol=1e-5) and torch.allclose(x.std(0), torch.ones(10))
    np.savez(tmp_path / "b.npz", X=X[:80], y=y[:80], X_test=X[80:], y_test=y[80:])
    dm = ArraysDataModule(str(tmp_path / "b.npz"), val_size=0)
    assert torch.equal(dm.test_set.tensors[1], torch.tensor(y[80:])) and len(dm.train_set) == 80


@pytest.mark.parametrize("arrays,message", [
    ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "no array 'X' (found ['x', 'y'])"),
    ({"X": np.zeros((4, 2))}, "expected exactly one of 'y'"),
    ({"X": np.zeros((4, 2)), "y": np.zeros(5)}, "y must be (4,) like X's rows, got shape (5,)"),
    ({"X": np.zeros((4, 2)), "Y": np.zeros((3, 2))}, "Y must be (4, k) like X's rows, got shape (3, 2)"),
    ({"X": np.array([[0.0, np.nan], [1, 2], [3, np.inf], [4, 5]]), "y": np.zeros(4)},
     "X has NaN or inf values in 2 rows"),
    ({"X": np.zeros((4, 2)), "y": np.array([0, 1, 1.5, 2])}, "y must hold integer labels in [0, C); found values such as [1.5]"),
    ({"X": np.zeros((4, 2)), "y": np.array([0, 1, -1, 2])}, "found values such as [-1.0]"),
    ({"X": np.zeros(4), "y": np.zeros(4)}, "X must be (n, d) with n ≥ 1, got shape (4,)"),
    ({"X": np.zeros((4, 2)), "y": np.zeros(4), "X_test": np.zeros((2, 3)), "y_test": np.zeros(2)},
     "X_test has 3 features, X has 2"),
])
def test_bad_array_files_get_their_message(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=re.escape(message)):
        ArraysDataModule(str(tmp_path / "bad.npz"), val_size=0, test_size=1)


def test_bad_array_paths_and_label_range(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        ArraysDataModule(str(tmp_path / "none.npz"))
    (tmp_path / "d.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"unknown file type '.csv'; use .npz or .pt"):
        ArraysDataModule(str(tmp_path / "d.csv"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz file"):
        ArraysDataModule(str(tmp_path / "junk.npz"))
    np.savez(tmp_path / "l.npz", X=np.zeros((6, 2)), y=np.array([0, 1, 2, 3, 0, 1]))
    with pytest.raises(ValueError, match=re.escape("label 3 found, but n_classes=3 (labels must be integers in [0, 3))")):
        ArraysDataModule(str(tmp_path / "l.npz"), n_classes=3, val_size=0)


def test_model_sizes_come_from_the_data_and_a_mismatch_is_named(tmp_path, mnist_dir):
    X, y = _classification_file(tmp_path / "c.npz", n=60, d=7, C=4)
    cfg = make_cfg(["data=arrays", f"data.path={tmp_path / 'c.npz'}", "logger=none", "progress_bar=false"], tmp_path)
    _, model, *_ = build(cfg, tmp_path)
    assert (model.n_in, model.n_out) == (7, 4)
    with pytest.raises(ValueError, match="model.n_out=10 does not match the data's 4 classes"):
        build(make_cfg(["data=arrays", f"data.path={tmp_path / 'c.npz'}", "model.n_out=10", "logger=none"],
                       tmp_path), tmp_path)


def test_wandb_offline_run_config_holds_the_whole_config(tmp_path, mnist_dir, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)        # offline must be the default
    monkeypatch.setenv("WANDB_SILENT", "true")
    over = [o for o in QUICK_MNIST if not o.startswith("logger=")]
    train(make_cfg([*over, "data=fashion_mnist", "data.train_subset=512", "model.layers=[40]", "seed=3",
                    "trainer.max_steps=1"], tmp_path, mnist_dir))
    conf = wandb_offline_config(tmp_path)
    assert conf["model"]["layers"] == [40] and conf["solver"]["name"] == "anderson" and conf["rule"]["name"] == "w3"
    assert conf["data"]["dataset"] == "fashion_mnist" and conf["seed"] == 3
    import yaml
    hparams = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert hparams["model"]["layers"] == [40] and hparams["data"]["dataset"] == "fashion_mnist"
    assert json.loads((tmp_path / "results.json").read_text())["data"] == "fashion_mnist"


def test_val_size_zero_runs_no_validation(tmp_path, mnist_dir):
    res = train(make_cfg([*QUICK_MNIST, "data.val_size=0", "trainer.max_epochs=2"], tmp_path, mnist_dir))
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert res["validation"] == "none" and res["steps"] == 8 and res["test_acc"] is not None
    assert not [h for h in header if h.startswith("val/")]
