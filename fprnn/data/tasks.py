"""Tasks in time: trials with inputs, targets and loss weights per step, and what a network in time
needs to know of each — where its static start ends, which steps count and how much, and when it
answers. Three sources, one trial format (`Trial`) and one batch format ([`collate`][fprnn.data.trials.collate]):

- a NeuroGym task (``neurogym`` on PyPI) by its id, ``ContextDecisionMaking-v0``;
- a user's own NeuroGym ``TrialEnv`` subclass, ``task="my_tasks:MyTask"`` (imported from the
  working directory or ``PYTHONPATH``), seeded exactly as the registered ids;
- trials a user generated (PsychRNN's and nn4n's convention: inputs, targets and a mask per step),
  from a ``.npz`` file ([`TrialFileDataModule`][fprnn.data.trial_files.TrialFileDataModule]).

Targets are either **actions** (one integer per step, cross-entropy) or **continuous** (a vector per
step, masked mean squared error): NeuroGym's ``Box`` action spaces, and tasks whose ground truth is
not an action index (the Reaching1D family stores the target angle). ``loss="auto"`` follows them.

Trial k of a split is drawn by a generator seeded with (seed, split, k) alone, so the validation and
test trials are the same in every run with one seed, and a resumed run draws the training trials it
had not seen.

The static part of a trial (``static``): the leading periods over which the input is constant —
fixation, a context cue — found from the data (``auto``: periods are taken in order while the input
stays equal to its first value), or named (the static part ends with that period, whose input must
then be constant), or ``none``. A network starting at the fixed point of that constant input
([`fprnn.models.ctrnn`][fprnn.models.ctrnn]) replaces simulating it.

Each source has its module — the trial format [`fprnn.data.trials`][fprnn.data.trials], NeuroGym
[`fprnn.data.neurogym_tasks`][fprnn.data.neurogym_tasks], files [`fprnn.data.trial_files`][fprnn.data.trial_files];
this one names them together (the configs' ``_target_`` and run directories written before the
split name ``fprnn.data.tasks``).
"""
from fprnn.data.neurogym_tasks import (CONDITIONS, NeuroGymDataModule, draw_trial, make_env, merged, no_trials,
                                       refusal, target_kind, task_names)
from fprnn.data.trial_files import FILE_KEYS, TrialFileDataModule, load_trials
from fprnn.data.trials import (LOSSES, SPLITS, EpochTrials, Trial, TrialData, TrialSet, collate, constant_prefix,
                               static_steps)

__all__ = ["CONDITIONS", "FILE_KEYS", "LOSSES", "SPLITS", "EpochTrials", "NeuroGymDataModule", "Trial", "TrialData",
           "TrialFileDataModule", "TrialSet", "collate", "constant_prefix", "draw_trial", "load_trials", "make_env",
           "merged", "no_trials", "refusal", "static_steps", "target_kind", "task_names"]
