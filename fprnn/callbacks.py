"""Lightning callbacks: saving on interruption, and the diagnostics monitors."""
from __future__ import annotations

from pytorch_lightning.callbacks import OnExceptionCheckpoint


class CheckpointOnInterrupt(OnExceptionCheckpoint):
    """Saves ``<dirpath>/last.ckpt`` at the last finished step when training is interrupted
    (Ctrl-C, SIGTERM) or fails, and — unlike Lightning's OnExceptionCheckpoint — keeps it."""

    def __init__(self, dirpath: str, filename: str = "last"):
        super().__init__(dirpath, filename)

    def teardown(self, trainer, *args, **kwargs) -> None:
        pass
