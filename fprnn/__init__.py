"""fprnn: learning the fixed points of recurrent networks with the reparameterized rules of
Zhu & Rosenbaum (2024).

The package's parts, one subpackage each:

- [`fprnn.core`][fprnn.core] — the mathematics on tensors: activations, dynamics, solvers, the rules
  (w1 … w4, jfb), the implicit backward, operators (dense or convolutional W), constraints.
- [`fprnn.models`][fprnn.models] — networks built from the core: the dense stack, ``FixedPointLayer`` for any
  PyTorch model, the convolutional layer, ``TrialRNN`` in time.
- [`fprnn.data`][fprnn.data] — data modules: image sets, arrays and responses, tasks in time, mazes.
- [`fprnn.training`][fprnn.training] — Lightning modules, callbacks, checkpoints and ``run.train`` behind
  ``train.py``.
- [`fprnn.analysis`][fprnn.analysis] — fixed points of trained networks, figures, loss landscapes.
- [`fprnn.tools`][fprnn.tools] — sweeps and benchmarks.

The core imports only torch; the models only torch and the core: neither imports Lightning,
Hydra, W&B or matplotlib, and ``import fprnn`` loads only these two.
"""
from fprnn.core import rules, solvers
from fprnn.models.conv import ConvFixedPointLayer
from fprnn.models.ctrnn import TrialRNN
from fprnn.models.layer import FixedPointLayer

__all__ = ["ConvFixedPointLayer", "FixedPointLayer", "TrialRNN", "rules", "solvers"]
