"""Training with Lightning and Hydra: the module that applies a rule each step (``module``,
with the problem's ``objectives`` and the step's checks and records in ``update``), callbacks, checkpoints, the console, DDP, and ``run.train``, the
function behind ``train.py``."""
