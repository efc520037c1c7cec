"""A stand-in for an operator: sends this process a real signal (or dies) when training reaches a step."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """At the start of the batch after optimizer step ``step``: ``os.kill(getpid(), signal)``, or raise (a crash)."""

    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        self.step, self.signal_name, self.sent = step, signal_name, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.sent or trainer.global_step != self.step:
            return
        self.sent = True
        if self.signal_name == "crash":
            raise RuntimeError(f"crash at step {self.step}")
        os.kill(os.getpid(), getattr(signal, self.signal_name))
