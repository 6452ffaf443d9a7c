"""Compose the project's Hydra config for tests, as `python train.py ...` would."""
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import open_dict

import fprnn.training.run  # noqa: F401  (registers the config resolvers)

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


def wandb_offline_records(run_dir):
    """The protobuf records of the one offline W&B run under ``run_dir/wandb``: the .wandb file is
    a LevelDB-style log (a 7-byte header, then 32 KiB blocks of chunks with 7-byte headers)."""
    import time

    from wandb.proto import wandb_internal_pb2 as pb
    (path,) = list(Path(run_dir).glob("wandb/offline-run-*/*.wandb"))
    for _ in range(120):   # W&B's service may still be writing the run's last records
        records = _read_records(path.read_bytes(), pb)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.5)
    return records


def _read_records(b: bytes, pb) -> list:
    import struct
    block, pos, cur, records = 32768, 7, b"", []
    while pos + 7 <= len(b):
        if block - pos % block < 7:              # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", b[pos:pos + 7])
        if (n == 0 and kind == 0) or pos + 7 + n > len(b):
            break                                 # the end, or a chunk still being written
        cur, pos = cur + b[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):                        # FULL or LAST chunk ends a record
            rec = pb.Record()
            try:
                rec.ParseFromString(cur)
            except Exception:                     # a record still being written
                break
            records.append(rec)
            cur = b""
    return records


def _items(items) -> dict:
    """A dict from W&B's (key or nested key, JSON value) items."""
    import json
    out: dict = {}
    for item in items:
        path = [item.key] if item.key else list(item.nested_key)
        d = out
        for k in path[:-1]:
            d = d.setdefault(k, {})
        d[path[-1]] = json.loads(item.value_json)
    return out


def wandb_offline_config(run_dir) -> dict:
    conf = {}
    for rec in wandb_offline_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind in ("config", "run"):
            conf.update(_items(rec.config.update if kind == "config" else rec.run.config.update))
    return conf


def wandb_offline_history(run_dir) -> list[dict]:
    return [_items(rec.history.item) for rec in wandb_offline_records(run_dir)
            if rec.WhichOneof("record_type") == "history"]


def loss_rows(run_dir) -> list[tuple[str, str]]:
    """(step, train/loss_step) of every row of a run's CSV log."""
    import csv
    with open(Path(run_dir) / "csv" / "metrics.csv", newline="") as fh:
        return [(r["step"], r["train/loss_step"]) for r in csv.DictReader(fh) if r.get("train/loss_step")]
