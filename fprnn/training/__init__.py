"""Training with Lightning and Hydra: the modules that apply a rule each step (``module``,
``trial_module``, ``update``), callbacks, checkpoints, the console, DDP, and ``run.train``, the
function behind ``train.py``."""
