"""NeuroGym tasks as trials ([`fprnn.data.trials`][fprnn.data.trials]): a task by its id
(``ContextDecisionMaking-v0``, ``neurogym`` on PyPI), or a user's own NeuroGym ``TrialEnv``
subclass, ``task="my_tasks:MyTask"`` (imported from the working directory or ``PYTHONPATH``),
seeded exactly as the registered ids. Continuous targets: NeuroGym's ``Box`` action spaces, and
tasks whose ground truth is not an action index (the Reaching1D family stores the target angle).
"""
from __future__ import annotations

import importlib
import inspect
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fprnn.core.checks import number, positive_int
from fprnn.data.trials import SPLITS, Trial, TrialData, static_steps

CONDITIONS = ("context", "coh")


def task_names() -> list[str]:
    from neurogym.envs.registration import all_envs
    return all_envs()


def _env_class(task: str, names: list[str]):
    """The TrialEnv class behind ``task``: ``module:Class`` imported (the working directory first on
    the path, as Python does for a script), or a registered NeuroGym id's entry point."""
    if ":" in task:
        module, _, name = task.partition(":")
        if str(Path.cwd()) not in sys.path:
            sys.path.insert(0, str(Path.cwd()))
        try:
            found = importlib.import_module(module)
        except ModuleNotFoundError as e:
            raise ValueError(f"task {task!r}: cannot import module {module!r} ({e}); put it in the working "
                             f"directory or on PYTHONPATH") from None
        except Exception as e:      # the user's module itself fails: say where, as one line
            raise ValueError(f"task {task!r}: importing module {module!r} failed: {type(e).__name__}: {e}") from None
        cls = getattr(found, name, None)
        if cls is None:
            raise ValueError(f"task {task!r}: module {module!r} has no {name!r}")
        from neurogym.core import TrialEnv
        if not (isinstance(cls, type) and issubclass(cls, TrialEnv)):
            raise ValueError(f"task {task!r} is not a NeuroGym TrialEnv subclass (got {cls!r}); a task of "
                             f"your own subclasses neurogym.core.TrialEnv and builds its trials in _new_trial")
        return cls
    if task not in names:
        raise ValueError(f"unknown NeuroGym task {task!r}; choose one of {', '.join(names)}, or give your own "
                         f"as module:Class")
    import gymnasium
    from gymnasium.envs.registration import load_env_creator
    return load_env_creator(gymnasium.spec(task).entry_point)


def make_env(task: str, dt: float, kwargs: dict | None):
    """The TrialEnv for ``task`` — a NeuroGym id such as ``ContextDecisionMaking-v0`` or a class of
    the user's, ``module:Class`` — with time step ``dt`` (ms) and the env's own options."""
    import neurogym
    kwargs = dict(kwargs or {})
    if "dt" in kwargs:
        raise ValueError(f"give the time step as data.dt (the network's Euler step uses it too), "
                         f"not in data.kwargs (got dt={kwargs['dt']!r})")
    cls = _env_class(task, [] if ":" in task else task_names())
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        params = {}
    required = [n for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in kwargs]
    if required:
        raise ValueError(f"task {task!r} needs options {', '.join(required)}: give them in data.kwargs, "
                         f"e.g. data.kwargs={{{', '.join(f'{n}: …' for n in required)}}}")
    if params and "dt" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"task {task!r} takes no dt argument; a TrialEnv's __init__ takes dt (ms) and passes "
                         f"it to TrialEnv.__init__(dt=dt)")
    with warnings.catch_warnings():
        # Gymnasium asks every env for render_modes, which NeuroGym's trial generators do not have
        warnings.filterwarnings("ignore", message=".*render_modes.*", module="gymnasium")
        try:
            env = neurogym.make(task, dt=dt, **kwargs).unwrapped if ":" not in task else cls(dt=dt, **kwargs)
        except TypeError as e:
            raise ValueError(f"task {task!r} rejects data.kwargs={kwargs}: {e}") from None
    return env


def refusal(task: str, kwargs: dict | None = None, dt: float = 20) -> str | None:
    """Why ``task`` cannot be trained as it is configured (one line), or None if it can."""
    try:
        env = make_env(task, dt, kwargs)
        draw_trial(env, 0, "train", 0, "auto", "decision")
    except ValueError as e:
        return str(e)
    return None


def merged(base: dict, over: dict) -> dict:
    """``over`` merged into ``base``, nested dicts key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def target_kind(env, gt: np.ndarray) -> tuple[str, int]:
    """("actions", number of actions) or ("continuous", output channels) of a task, from its action
    space and a trial's ground truth: continuous when the space is a Box, the targets are vectors, or
    they are not indices of the Discrete space's actions (Reaching1D stores an angle)."""
    from gymnasium import spaces
    space = getattr(env, "action_space", None)
    if gt.ndim == 2:
        return "continuous", int(gt.shape[1])
    if isinstance(space, spaces.Discrete):
        whole = np.issubdtype(gt.dtype, np.integer) or bool((gt == np.round(gt)).all())
        if whole and gt.min() >= 0 and gt.max() < space.n:
            return "actions", int(space.n)
        return "continuous", 1
    if isinstance(space, spaces.Box) or np.issubdtype(gt.dtype, np.floating):
        return "continuous", 1
    raise ValueError(f"task {type(env).__name__}: its action_space {space!r} is neither Discrete (actions) nor "
                     f"Box (continuous targets)")


def no_trials(env) -> str | None:
    """Why ``env``'s last ``new_trial()`` gives nothing to train on, or None."""
    name = type(env).__name__
    if not getattr(env, "_ob_built", hasattr(env, "ob")):
        return (f"task {name} builds no inputs for its trials (no ob): it is a reinforcement-learning task that "
                f"is stepped, not a supervised one, and fprnn trains supervised tasks")
    if not getattr(env, "_gt_built", hasattr(env, "gt")):
        return (f"task {name} has no supervised target (no ground truth gt): it is a reinforcement-learning "
                f"task that learns from rewards, and fprnn trains supervised tasks")
    return None


def draw_trial(env, seed: int, split: str, k: int, static: str, decision_period: str,
               targets: tuple[str, int] | None = None) -> Trial:
    """Trial k of ``split``, from a generator seeded by (seed, split, k) alone. ``targets``: the
    task's (kind, size) from [`target_kind`][fprnn.data.neurogym_tasks.target_kind] (None: this trial's own)."""
    env.seed(int(np.random.SeedSequence([int(seed), SPLITS[split], int(k)]).generate_state(1)[0]))
    try:
        info = env.new_trial()
    except Exception as e:
        raise ValueError(f"task {type(env).__name__}: new_trial() failed on trial {k} of {split} "
                         f"({type(e).__name__}: {e})") from None
    why = no_trials(env)
    if why is not None:
        raise ValueError(why)
    ob, gt = np.asarray(env.ob, dtype=np.float32), np.asarray(env.gt)
    if ob.ndim != 2 or gt.shape[:1] != ob.shape[:1] or gt.ndim > 2:
        raise ValueError(f"task {type(env).__name__}: ob {ob.shape} and gt {gt.shape} must be (T, n_in) and (T,) "
                         f"or (T, n_out) with the same T")
    periods = sorted(((p, env.start_ind[p], env.end_ind[p]) for p in env.start_ind), key=lambda p: (p[1], p[2]))
    T = len(ob)
    if decision_period in env.start_ind and env.end_ind[decision_period] > env.start_ind[decision_period]:
        decision = (env.start_ind[decision_period], min(env.end_ind[decision_period], T))
    else:               # NeuroGym's own convention: the answer is the trial's last step
        decision = (T - 1, T)
    scalars = {key: v.item() if isinstance(v, np.generic) else v for key, v in (info or {}).items()
               if isinstance(v, (int, float, np.generic)) and not isinstance(v, bool)}
    if {"context", "coh_1", "coh_2"} <= scalars.keys():    # ContextDecisionMaking: the coherence that counts
        scalars["coh"] = scalars[f"coh_{int(scalars['context']) + 1}"]
    kind, size = targets or target_kind(env, gt)
    if kind == "actions":
        if gt.ndim != 1 or gt.min() < 0 or gt.max() >= size or not (gt == np.round(gt)).all():
            raise ValueError(f"task {type(env).__name__}: trial {k} of {split} has targets {np.unique(gt)[:8]} that "
                             f"are not its {size} actions")
        gt = gt.astype(np.int64)
    else:
        gt = gt.astype(np.float32).reshape(T, -1)
        if gt.shape[1] != size:
            raise ValueError(f"task {type(env).__name__}: trial {k} of {split} has {gt.shape[1]} targets per step, "
                             f"the task's first trial {size}")
    return Trial(ob, gt, static_steps(ob, periods, static), decision[1] - 1, decision, scalars, periods)


class NeuroGymDataModule(TrialData):
    """A NeuroGym task as training, validation and test trials (see the module docstring).

    ``task``: a NeuroGym id, or ``module:Class`` for a TrialEnv subclass of your own; ``kwargs``:
    the env's options (timing, dim_ring, use_expl_context…); ``dt``: the time step in ms (NeuroGym's
    and the network's). ``train_trials`` fresh trials make an epoch; ``val_trials`` and
    ``test_trials`` are drawn once. ``decision_weight``: the loss weight of the decision period's
    steps relative to the others (Yang et al. 2019 use 5); ``decision_period``: the period whose
    last step is the answer (tasks without one answer at their last step). ``conditions``: the keys
    of NeuroGym's trial info that make a condition for the test performance per condition (default:
    context and coherence, those a task has; for ContextDecisionMaking ``coh`` is the coherence of
    the modality the context makes relevant). ``task_kwargs``: options per task id, used when that
    task is the one chosen (a preset's well-posed timings), with ``kwargs`` merged over them — so
    that ``kwargs={}`` with another ``task`` gives that task its own defaults."""

    def __init__(self, task: str = "ContextDecisionMaking-v0", kwargs: dict | None = None, dt: float = 20,
                 static: str = "auto", decision_weight: float = 5.0, decision_period: str = "decision",
                 batch_size: int = 64, eval_batch_size: int = 512, train_trials: int = 6400,
                 val_trials: int = 512, test_trials: int = 1024, seed: int = 0,
                 conditions: list[str] | None = None, task_kwargs: dict | None = None, loss: str = "auto"):
        super().__init__(batch_size, eval_batch_size, seed, loss)
        for name, v in (("train_trials", train_trials), ("val_trials", val_trials), ("test_trials", test_trials)):
            positive_int(name, v)
        number("dt", dt, strict=True)
        number("decision_weight", decision_weight)
        if not isinstance(static, str):
            raise ValueError(f"static must be 'auto', 'none' or a period name, got {static!r}")
        self.env_id = self.name = task
        self.kwargs, self.dt, self.static = merged(dict(task_kwargs or {}).get(task, {}), kwargs or {}), dt, static
        self.decision_weight, self.decision_period = float(decision_weight), decision_period
        self.train_trials, self.val_trials, self.test_trials = train_trials, val_trials, test_trials
        self.condition_keys = list(conditions) if conditions is not None else list(CONDITIONS)
        self.env = make_env(task, dt, self.kwargs)
        self._targets = None
        first = self.draw("train", 0)
        self.n_in = int(first.ob.shape[1])
        self._targets = self.targets, self.n_out = target_kind(self.env, np.asarray(self.env.gt))
        self._check_loss()
        self._static_note(first, static)

    def draw(self, split: str, k: int) -> Trial:
        return draw_trial(self.env, self.seed, split, k, self.static, self.decision_period, self._targets)
