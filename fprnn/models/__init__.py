"""Networks built from [`fprnn.core`][fprnn.core]: the dense stack (``dense``), a layer for any PyTorch
model (``layer``), convolutional recurrence (``conv``, ``maze_net``), networks in time
(``ctrnn``) and read-in encoders. Imports torch only."""
