"""Sweeps of ``train.py`` (``sweep``) and benchmarks of the rules and solvers (``bench``)."""
