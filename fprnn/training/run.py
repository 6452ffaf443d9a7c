"""One training run from a Hydra config: build, fit, test, and leave results behind.

Writes into the run directory: ``results.json`` (always, also for a diverged or failed run),
``weights.pt`` (the network's state dict: every layer's W, V, b and the read-out) with
``model.json`` (``FixedPointRNN.load(run_dir)`` rebuilds the network), ``checkpoints/last.ckpt``,
with a held-out validation split ``checkpoints/best.ckpt`` (the best validation metric's network:
the one tested and saved as ``weights.pt``; results.json says which), CSV logs and the offline
W&B run.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import resource
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fprnn.core import constraints
from fprnn.analysis.fixed_points import analyse, probe_stability
from fprnn.training.checkpoint import ResumableCSVLogger, atomic_save, atomic_write_text, check_checkpoint

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
    n_in = getattr(data, "n_in", None)
    if n_in is not None and model.n_in != n_in:
        raise ValueError(f"model.n_in={model.n_in} does not match the data's input size {n_in}")
    if n_in is None and model.n_in is not None:
        raise ValueError(f"this data feeds x directly: set model.n_in=null (got {model.n_in})")
    n_out = getattr(data, "n_out", None)
    what = "classes" if data.task == "classification" else "targets"
    if n_out is None and model.n_out is not None:
        raise ValueError(f"this data's targets are r itself: set model.n_out=null (got {model.n_out})")
    if model.n_out != n_out:
        raise ValueError(f"model.n_out={model.n_out} does not match the data's {n_out} {what}")
    if n_out is None and getattr(data, "N", model.N) != model.N:
        raise ValueError(f"the last layer's size {model.N} (model.layers={model.sizes}) does not match the data's "
                         f"dimension N={data.N}")
    units = getattr(data, "units", None)
    if units is not None and int(units.max()) >= model.N:
        raise ValueError(f"the data records unit {int(units.max())}, but the network's last layer has {model.N} "
                         f"units (model.layers={model.sizes})")


def _model_sizes(cfg: DictConfig, data) -> dict:
    """model.n_in / n_out given as ``auto`` are the data's input size and classes (targets); an
    encoder's in_shape given as ``auto`` is the image data's [channels, height, width]."""
    sizes = {k: getattr(data, k) for k in ("n_in", "n_out") if cfg.model.get(k) == "auto"}
    if cfg.model.get("in_shape") == "auto":     # model=conv_recurrent
        shape = getattr(data, "image_shape", None)
        if shape is None:
            raise ValueError(f"model.in_shape=auto needs image data; {type(data).__name__} has no image shape")
        sizes["in_shape"] = list(shape)
    encoder = cfg.model.get("encoder")
    if encoder is not None and encoder.get("in_shape") == "auto":
        shape = getattr(data, "image_shape", None)
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


def build(cfg: DictConfig, run_dir: Path | str):
    """Instantiate data, model, module, loggers, callbacks and trainer from the config."""
    run_dir = Path(run_dir)
    import hydra
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar

    from fprnn.training.checkpoint import (AtomicCheckpointIO, RunCheckpoint, best_callbacks, best_metric,
                                           load_init_weights)
    from fprnn.models.ctrnn import TrialRNN
    from fprnn.training.module import FixedPointModule
    from fprnn.training.trial_module import TrialModule

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    data = _instantiate(cfg.data)
    model = _instantiate(cfg.model, **_model_sizes(cfg, data))
    check_compatible(model, data)
    if getattr(data, "note", None):
        log.warning(data.note)
    in_time = isinstance(model, TrialRNN)
    if cfg.get("init_weights") is not None:
        load_init_weights(model, cfg.init_weights)
    if cfg.get("stable_init") is not None and in_time:
        raise ValueError("stable_init scales a static network's W; a network in time (model=ctrnn) has no "
                         "probe inputs to scale it on: set stable_init=null")
    if cfg.get("stable_init") is not None and not hasattr(model, "scale_to_stable"):
        raise ValueError(f"stable_init scales a dense W; {type(model).__name__} has none to scale: set stable_init=null")
    if cfg.get("stable_init") is not None and not (cfg.get("resume") or cfg.get("ckpt_path")):
        # on up to 256 training inputs: the probe batch alone can miss the hardest ones
        model.scale_to_stable(data.probe_batch(256)[0], float(cfg.stable_init))
    optimizer = hydra.utils.instantiate(cfg.optimizer) if cfg.get("optimizer") else None
    scheduler = hydra.utils.instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    options = dict(rule=cfg.rule.name, lr=cfg.lr, lr_readin=cfg.get("lr_readin"), lr_readout=cfg.get("lr_readout"),
                   rule_kwargs=_plain(cfg.rule.get("kwargs")), optimizer=optimizer, scheduler=scheduler,
                   **_plain(cfg.get("fault")), **_plain(cfg.get("module")))
    if in_time:
        module = TrialModule(model, targets=getattr(data, "targets", "actions"), **options)
    else:
        module = FixedPointModule(model, task=data.task, units=getattr(data, "units", None), **options)
    loggers = [hydra.utils.instantiate(c, save_dir=str(run_dir))
               for c in (cfg.get("logger") or {}).values() if c is not None]
    callbacks = [RunCheckpoint(run_dir / "checkpoints", **_plain(cfg.get("ckpt")))]
    best = _plain(cfg.get("best"))
    if best.get("monitor") is not None and _held_out_validation(data):
        monitor, mode = module.score if in_time else best_metric(data.task, getattr(data, "units", None) is not None)
        if best["monitor"] != "auto":
            monitor, mode = best["monitor"], best.get("mode") or mode
        callbacks += best_callbacks(run_dir / "checkpoints", monitor, mode, best.get("patience"))
    if cfg.get("progress_bar", True):
        callbacks.append(RichProgressBar())
    callbacks += [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    kept = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                      **({"enable_checkpointing": True} if kept else {}),
                                      default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()],
                                      enable_progress_bar=bool(cfg.get("progress_bar", True)))
    return data, model, module, trainer


def _held_out_validation(data) -> bool:
    """Validation on a split held out of the training set (not the paper's test-set protocol)."""
    return not getattr(data, "val_on_test", True) and bool(getattr(data, "val_size", 0))


def _best(trainer):
    from pytorch_lightning.callbacks import ModelCheckpoint
    return next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)


def _test(trainer, module, data) -> dict[str, Any]:
    tested = trainer.test(module, datamodule=data, verbose=False)[0]
    out = {"test_loss": tested.get("test/loss"), "test_acc": tested.get("test/acc")}
    for k in ("r2", "perf", "maze_acc", "settled"):
        if f"test/{k}" in tested:
            out[f"test_{k}"] = tested[f"test/{k}"]
    if getattr(module, "continuous", False):    # a network in time's loss on continuous targets is the MSE
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
        data, model, module, trainer = build(cfg, run_dir)
        results.update(task=data.task, data=getattr(data, "name", type(data).__name__))
        ckpt = cfg.get("ckpt_path")
        if cfg.get("resume") and not ckpt and (run_dir / "checkpoints" / "last.ckpt").exists():
            ckpt = str(run_dir / "checkpoints" / "last.ckpt")
        if ckpt:
            step = check_checkpoint(ckpt, model)
            for lg in trainer.loggers:
                if isinstance(lg, ResumableCSVLogger):
                    lg.resume_at(step)
        log_config(trainer, cfg)
        with _sigint_between_steps(module):
            trainer.fit(module, datamodule=data, ckpt_path=ckpt)
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


def finish(cfg, run_dir: Path, data, module, trainer, results: dict) -> dict[str, Any]:
    """Final numbers of a run that got as far as building: status, losses, stability, weights."""
    failed = results.get("error") is not None and module.record.status != "interrupted"
    out: dict[str, Any] = {"status": "failed" if failed else module.record.status,
                           "steps": int(trainer.global_step) if trainer is not None else 0}
    out.update(module.record.summary(), unsettled=module.unsettled)
    if getattr(data, "validation", None) is not None:
        out["validation"] = data.validation
    metrics = getattr(module, "fit_metrics", None) or (trainer.callback_metrics if trainer is not None else {})
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
    from fprnn.training.trial_module import TrialModule
    try:   # the final numbers must not cost the run its results.json
        if isinstance(module, TrialModule):
            out.update(_trials_final(run_dir, module, data, trainer))
        else:
            out.update(_static_final(cfg, data, module, trainer))
        if hasattr(data, "test_cells") and (trainer is None or trainer.is_global_zero):
            from fprnn.data.mazes import maze_report
            out.update(maze_report(m, data, run_dir))
    except Exception as e:
        out["final_metrics_error"] = f"{type(e).__name__}: {e}"
    if trainer is None or trainer.is_global_zero:
        atomic_save({k: v.detach().cpu() for k, v in m.state_dict().items()}, run_dir / "weights.pt")
        if m.config is not None:
            atomic_write_text(run_dir / "model.json", json.dumps(m.config, indent=2))
    return out


def _static_final(cfg, data, module, trainer) -> dict[str, Any]:
    """A static network's final numbers: stability and multistability at a probe batch's fixed
    points, the E/I analysis, the linear task's J(W)."""
    m, out = module.model, {}
    p, _ = data.probe_batch(int(cfg.get("probe_size", 16)))
    out.update(probe_stability(m, p))
    if hasattr(m, "multistable") and all(layer.dyn.continuous for layer in m.layers):
        out["multistable"] = float(m.multistable(p.to(module.device)).float().mean())
    out.update(_stability_peak(trainer, out))
    if any(layer.sign is not None for layer in m.layers):
        out.update(_ei_analysis(m, data))
    if callable(getattr(data, "loss", None)):      # the linear task's J(W), eq 3.1
        W = m.W.detach()
        out["loss_W"] = data.loss(W)
        out["loss_W_star"] = data.loss(data.W_star().to(W.dtype))
        out["test_loss"] = out["loss_W"]
    return out


def _trials_final(run_dir: Path, module, data, trainer) -> dict[str, Any]:
    """A network in time's final numbers: how its trials started, the test performance per
    condition (and every test trial's choice in ``trials.json``), E/I sign violations."""
    from fprnn.training.trial_module import perf_by_condition
    m, stats = module.model, module.start_stats
    out: dict[str, Any] = {"start": m.start, "start_from_rest": stats["from_rest"], "start_unstable": stats["unstable"],
                           "test_start_from_rest": stats.get("test_from_rest", 0),
                           "test_start_unstable": stats.get("test_unstable", 0),
                           "graph_mb_max": stats["graph_mb_max"], "start_stability_max": stats["stability_max"],
                           "targets": getattr(data, "targets", "actions"),
                           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if module.test_records and not module.continuous:
        out["test_perf_by_condition"] = perf_by_condition(module.test_records, data.condition_keys)
        # chance: always answering the test trials' most frequent target
        targets = [r["target"] for r in module.test_records]
        out["test_chance"] = max(targets.count(t) for t in set(targets)) / len(targets)
    if module.test_records and (trainer is None or trainer.is_global_zero):
        atomic_write_text(run_dir / "trials.json", json.dumps(module.test_records))
    layer = m.layer
    if layer.sign is not None or layer.mask is not None:
        out["constraint_violations"] = constraints.violations(layer.W.detach(), layer.sign, layer.mask)
    return out


def _ei_analysis(model, data) -> dict[str, Any]:
    """fprnn.analysis.fixed_points at the test stimuli's fixed points (up to 256): the fitted network's, and a
    teacher's (data=ssn_teacher) for comparison."""
    p = data.test_set.tensors[0][:256]
    out = {"analysis": analyse(model, p)}
    if getattr(data, "teacher", None) is not None:
        out["teacher_analysis"] = analyse(data.teacher, p)
    return out


def _stability_peak(trainer, final: dict) -> dict[str, Any]:
    """The worst stability seen while training (StabilityMonitor), the final probe included."""
    from fprnn.training.callbacks import StabilityMonitor, update_peak
    mon = next((c for c in trainer.callbacks if isinstance(c, StabilityMonitor)), None)
    return update_peak(dict(mon.peak) if mon is not None else {}, final, int(trainer.global_step))


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
