"""One training run from a Hydra config: build, fit, test, and leave results behind.

Writes into the run directory: ``results.json`` (always, also for a diverged or failed run),
``weights.pt`` (the network's state dict: every layer's W, V, b and the read-out) with
``model.json`` (``FixedPointRNN.load(run_dir)`` rebuilds the network), ``checkpoints/last.ckpt``,
with a held-out validation split ``checkpoints/best.ckpt`` (the best validation metric's network:
the one tested and saved as ``weights.pt``; results.json says which), CSV logs and the offline
W&B run; with restarts, ``attempts/<k>/`` for each attempt set aside ([`fprnn.training.restarts`][fprnn.training.restarts]).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fprnn.training.checkpoint import ResumableCSVLogger, atomic_save, atomic_write_text, check_checkpoint
from fprnn.training.restarts import GiveWay, Restart, attempt_seed, attempts_set_aside, set_aside

log = logging.getLogger(__name__)
#: the summary's copy for Hydra's train.log (the console gets it printed; conf/train.yaml)
summary_log = logging.getLogger("fprnn.summary")

# W&B is offline unless the user asks for online (an account is then needed).
OmegaConf.register_new_resolver(
    "wandb_offline", lambda: os.environ.get("WANDB_MODE", "offline") != "online", replace=True)


def _run_dir(cfg: DictConfig) -> Path:
    if cfg.get("run_dir"):
        return Path(cfg.run_dir)
    try:
        from hydra.core.hydra_config import HydraConfig
        return Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return Path.cwd()


def _finite(x):
    if isinstance(x, torch.Tensor):
        x = float(x)
    return x if x is None or not isinstance(x, float) or math.isfinite(x) else str(x)


@contextlib.contextmanager
def _sigint_between_steps(module):
    """The first Ctrl-C asks the module to stop before its next step (and save); a second one
    interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        module.interrupt_requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})


def check_compatible(model, data) -> None:
    """Sizes of model and data must agree; say which value is wrong."""
    n_in = data.n_in
    if n_in is not None and model.n_in != n_in:
        raise ValueError(f"model.n_in={model.n_in} does not match the data's input size {n_in}")
    if n_in is None and model.n_in is not None:
        raise ValueError(f"this data feeds x directly: set model.n_in=null (got {model.n_in})")
    n_out = data.n_out
    what = "classes" if data.task == "classification" else "targets"
    if n_out is None and model.n_out is not None:
        raise ValueError(f"this data's targets are r itself: set model.n_out=null (got {model.n_out})")
    if model.n_out != n_out:
        raise ValueError(f"model.n_out={model.n_out} does not match the data's {n_out} {what}")
    if n_out is None and data.N is not None and data.N != model.N:
        raise ValueError(f"the last layer's size {model.N} (model.layers={model.sizes}) does not match the data's "
                         f"dimension N={data.N}")
    units = data.units
    if units is not None and int(units.max()) >= model.N:
        raise ValueError(f"the data records unit {int(units.max())}, but the network's last layer has {model.N} "
                         f"units (model.layers={model.sizes})")


def _model_sizes(cfg: DictConfig, data) -> dict:
    """model.n_in / n_out given as ``auto`` are the data's input size and classes (targets); an
    encoder's in_shape given as ``auto`` is the image data's [channels, height, width]."""
    sizes = {k: v for k, v in (("n_in", data.n_in), ("n_out", data.n_out)) if cfg.model.get(k) == "auto"}
    shape = data.image_shape
    if cfg.model.get("in_shape") == "auto":     # model=conv_recurrent
        if shape is None:
            raise ValueError(f"model.in_shape=auto needs image data; {type(data).__name__} has no image shape")
        sizes["in_shape"] = list(shape)
    encoder = cfg.model.get("encoder")
    if encoder is not None and encoder.get("in_shape") == "auto":
        if shape is None:
            raise ValueError(f"model.encoder.in_shape=auto needs image data; {type(data).__name__} has no "
                             f"image shape: give model.encoder.in_shape=[channels,height,width]")
        sizes["encoder"] = {**_plain(encoder), "in_shape": list(shape)}
    return sizes


def log_config(trainer, cfg: DictConfig) -> None:
    """The whole resolved config (model, solver, rule, data, optimizer, trainer, seed, …) as the
    hyperparameters of every logger: the W&B run config, the CSV logger's hparams.yaml."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("hydra", None)
    for lg in trainer.loggers:
        lg.log_hyperparams(config)


def _instantiate(node, **kw):
    """hydra.utils.instantiate, but a ValueError from our constructors reaches the user as is."""
    import hydra
    from hydra.errors import InstantiationException
    try:
        return hydra.utils.instantiate(node, **kw)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, FileNotFoundError)):
            raise e.__cause__ from None
        raise


def build(cfg: DictConfig, run_dir: Path | str, attempt: int = 0):
    """Instantiate data, model, module, loggers, callbacks and trainer from the config; ``attempt``
    k > 0 initialises the network from another seed (``restart``: [`fprnn.training.restarts`][fprnn.training.restarts])."""
    run_dir = Path(run_dir)
    import hydra
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar

    from fprnn.training.checkpoint import AtomicCheckpointIO, RunCheckpoint, best_callbacks, load_init_weights
    from fprnn.training import objectives

    restart = Restart(**_plain(cfg.get("restart")))
    seed = attempt_seed(int(cfg.seed), attempt)
    pl.seed_everything(seed, workers=True, verbose=False)
    data = _instantiate(cfg.data)
    model = _instantiate(cfg.model, **_model_sizes(cfg, data), **({"seed": seed} if "seed" in cfg.model else {}))
    check_compatible(model, data)
    if data.note:
        log.warning(data.note)
    if cfg.get("init_weights") is not None:
        load_init_weights(model, cfg.init_weights)
    if cfg.get("stable_init") is not None and not (cfg.get("resume") or cfg.get("ckpt_path")):
        # on up to 256 training inputs: the probe batch alone can miss the hardest ones
        model.scale_to_stable(data.probe_batch(256)[0], float(cfg.stable_init))
    optimizer = hydra.utils.instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = _instantiate(cfg.module)(model, objectives.for_data(data), rule=cfg.rule.name, lr=cfg.lr,
                                      lr_readin=cfg.get("lr_readin"), lr_readout=cfg.get("lr_readout"),
                                      rule_kwargs=_plain(cfg.rule.get("kwargs")), optimizer=optimizer,
                                      scheduler=scheduler, **_plain(cfg.get("fault")))
    loggers = [hydra.utils.instantiate(c, save_dir=str(run_dir))
               for c in (cfg.get("logger") or {}).values() if c is not None]
    callbacks = [RunCheckpoint(run_dir / "checkpoints", **_plain(cfg.get("ckpt")))]
    best = _plain(cfg.get("best"))
    if best.get("monitor") is not None and _held_out_validation(data):
        monitor, mode = module.score
        if best["monitor"] != "auto":
            monitor, mode = best["monitor"], best.get("mode") or mode
        callbacks += best_callbacks(run_dir / "checkpoints", monitor, mode, best.get("patience"))
    if cfg.get("progress_bar", True):
        callbacks.append(RichProgressBar())
    callbacks += [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    give_way = restart.callback(attempt, cfg.trainer.get("max_epochs"), _held_out_validation(data))
    if give_way is not None:
        callbacks.append(give_way)
    kept = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                      **({"enable_checkpointing": True} if kept else {}),
                                      default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()],
                                      enable_progress_bar=bool(cfg.get("progress_bar", True)))
    return data, model, module, trainer


def _held_out_validation(data) -> bool:
    """Validation on a split held out of the training set (not the paper's test-set protocol)."""
    return not data.val_on_test and bool(data.val_size)


def _best(trainer):
    from pytorch_lightning.callbacks import ModelCheckpoint
    return next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)


def _test(trainer, module, data) -> dict[str, Any]:
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    out = {"test_loss": tested.get("test/loss"), "test_acc": tested.get("test/acc")}
    for k in ("r2", "perf", "maze_acc", "settled"):
        if f"test/{k}" in tested:
            out[f"test_{k}"] = tested[f"test/{k}"]
    if data.targets == "continuous":    # a network in time's loss on continuous targets is the MSE
        out["test_mse"] = out["test_loss"]
    out["solver_max_residual"] = tested.get("test/max_residual")
    return out


def test_best(trainer, module, data) -> dict[str, Any]:
    """Test the last network; then, if a best checkpoint was kept, put its network in the module
    and test that one: it is the run's result (``test_…``, ``weights.pt``), the last network's
    numbers follow as ``last_test_…``."""
    last = _test(trainer, module, data)
    cb = _best(trainer)
    if cb is None or not cb.best_model_path or not Path(cb.best_model_path).is_file():
        return {**last, "weights": "last"}
    from fprnn.training.checkpoint import checkpoint_weights
    weights, where = checkpoint_weights(cb.best_model_path)
    module.model.load_state_dict(weights)
    out = _test(trainer, module, data)
    out.update({f"last_{k}": v for k, v in last.items() if k.startswith("test_")})
    out.update(weights="best", best_checkpoint=cb.best_model_path, best_metric=cb.monitor,
               best_score=_finite(cb.best_model_score), best_epoch=where["epoch"], best_step=where["global_step"])
    return out


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build, fit and test one run; write its results and print its summary ([`fprnn.training.console`][fprnn.training.console])."""
    from fprnn.training import console
    if not (cfg.get("verbose") or os.environ.get("HYDRA_FULL_ERROR") == "1"):
        console.quiet()
    run_dir = _run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"status": "failed", "rule": cfg.rule.name, "lr": cfg.lr,
                               "solver": cfg.solver.name, "dynamics": cfg.model.get("dynamics"),
                               "seed": cfg.seed, "run_dir": str(run_dir)}
    module = trainer = data = None
    error = None
    try:
        attempts = attempts_set_aside(run_dir)      # a resumed run goes on with the attempt it was in
        ckpt = cfg.get("ckpt_path")
        if cfg.get("resume") and not ckpt and (run_dir / "checkpoints" / "last.ckpt").exists():
            ckpt = str(run_dir / "checkpoints" / "last.ckpt")
        while True:
            data, model, module, trainer = build(cfg, run_dir, len(attempts))
            results.update(task=data.task, data=data.name or type(data).__name__, attempt=len(attempts),
                           init_seed=attempt_seed(int(cfg.seed), len(attempts)))
            if ckpt:
                step = check_checkpoint(ckpt, model)
                for lg in trainer.loggers:
                    if isinstance(lg, ResumableCSVLogger):
                        lg.resume_at(step)
            log_config(trainer, cfg)
            with _sigint_between_steps(module):
                trainer.fit(module, datamodule=data, ckpt_path=ckpt)
            give_way = next((c for c in trainer.callbacks if isinstance(c, GiveWay)), None)
            ended = module.record.status if module.record.status in ("diverged", "no_progress") else None
            if give_way is None or module.interrupt_requested or not (give_way.gave_way or ended):
                break
            attempts.append(_give_way(cfg, run_dir, trainer, give_way, len(attempts), ended))
            ckpt = None
        if attempts:
            results["attempts"] = attempts
        module.fit_metrics = {k: _finite(v) for k, v in trainer.callback_metrics.items()}
        if module.record.status == "running":
            module.record.status = "finished"
        results.update(test_best(trainer, module, data))
    except BaseException as e:  # recorded, then re-raised: a crash is not a result
        error = e
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit)) and trainer is not None \
            and trainer.state.status == "interrupted"
        if interrupted and module is not None:
            module.record.status = "interrupted"
            results["error"] = f"interrupted ({type(e).__name__}); resume with ckpt_path=" \
                               f"{run_dir / 'checkpoints' / 'last.ckpt'}"
        elif isinstance(e, (ValueError, FileNotFoundError)):   # a user's to fix: the message is the whole story
            results["error"] = str(e)
        else:
            results["error"] = "".join(traceback.format_exception_only(type(e), e)).strip()
    finally:
        if module is not None:
            results.update(finish(cfg, run_dir, data, module, trainer, results))
        results["wall_s"] = time.perf_counter() - t0
        _close_wandb(trainer, failed=error is not None)
        if trainer is None or trainer.is_global_zero:
            atomic_write_text(run_dir / "results.json",
                              json.dumps({k: _finite(v) for k, v in results.items()}, indent=2))
            _report(console.summary(results))
    if error is not None:
        if results["status"] == "interrupted":   # the shell's codes for SIGTERM / Ctrl-C
            raise SystemExit(143 if type(error).__name__ == "SIGTERMException" else 130)
        raise error
    if cfg.get("strict") and (results["status"] != "finished" or results.get("faults")):
        raise SystemExit(f"strict=true: the run ended with status {results['status']!r} and "
                         f"{results.get('faults')} faults (see {run_dir / 'results.json'})")
    return results


def _give_way(cfg, run_dir: Path, trainer, give_way: GiveWay, attempt: int, ended: str | None) -> dict[str, Any]:
    """Set aside an attempt that has not learned or that ended early ("diverged", "no_progress"),
    and say so (restarts: [`fprnn.training.restarts`][fprnn.training.restarts])."""
    why = ended or "not learned"
    record = {"attempt": attempt, "init_seed": attempt_seed(int(cfg.seed), attempt), "ended": why,
              "monitor": give_way.monitor, "best": give_way.best, "threshold": give_way.threshold,
              "epochs": int(trainer.current_epoch), "steps": int(trainer.global_step)}
    _close_wandb(trainer, failed=False)
    where = set_aside(run_dir, record)
    log.warning(f"attempt {attempt}: {why} ({give_way.monitor}: best {give_way.best}, {give_way.threshold} needed "
                f"within {give_way.by_epoch} epochs); set aside in {where}; attempt {attempt + 1} starts from seed "
                f"{attempt_seed(int(cfg.seed), attempt + 1)}")
    return record


def finish(cfg, run_dir: Path, data, module, trainer, results: dict) -> dict[str, Any]:
    """Final numbers of a run that got as far as building: status, losses, stability, weights."""
    failed = results.get("error") is not None and module.record.status != "interrupted"
    out: dict[str, Any] = {"status": "failed" if failed else module.record.status,
                           "steps": int(trainer.global_step) if trainer is not None else 0}
    out.update(module.record.summary(), unsettled=module.unsettled)
    if data.validation is not None:
        out["validation"] = data.validation
    metrics = module.fit_metrics or (trainer.callback_metrics if trainer is not None else {})
    out["train_loss"] = _finite(metrics.get("train/loss_epoch"))
    if "train/acc_epoch" in metrics:
        out["train_acc"] = _finite(metrics.get("train/acc_epoch"))
    for k in ("acc", "r2", "perf", "maze_acc", "settled"):
        if f"val/{k}" in metrics:
            out[f"val_{k}"] = _finite(metrics.get(f"val/{k}"))     # the last validation (what tuning reads)
    out["epochs"] = int(trainer.current_epoch) if trainer is not None else 0
    m = module.model
    out["params"] = {"W": sum(layer.W.numel() for layer in m.layers),
                     "readin": sum(t.numel() for t in m.readins()),
                     "readout": sum(t.numel() for _, t in m.named_readouts())}
    try:   # the final numbers must not cost the run its results.json
        out.update(module.objective.final(run_dir, data, module, trainer, int(cfg.get("probe_size", 16))))
    except Exception as e:
        out["final_metrics_error"] = f"{type(e).__name__}: {e}"
    if trainer is None or trainer.is_global_zero:
        atomic_save({k: v.detach().cpu() for k, v in m.state_dict().items()}, run_dir / "weights.pt")
        if m.config is not None:
            atomic_write_text(run_dir / "model.json", json.dumps(m.config, indent=2))
    return out


def _report(lines: list[str]) -> None:
    """The run's summary: on the console as fprnn's last output, and in Hydra's ``train.log``."""
    print("\n".join(lines), flush=True)
    for line in lines:
        summary_log.info(line)


def _close_wandb(trainer, failed: bool) -> None:
    """Finish the W&B run (one per training run), also when the run failed."""
    import sys
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=1 if failed else 0)
