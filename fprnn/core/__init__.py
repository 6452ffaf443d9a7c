"""The mathematics of fixed-point learning on plain tensors: activations, dynamics, solvers, the
rules, the implicit backward, operators and constraints. Imports torch only."""
