"""A stand-in for an operator: sends this process a real signal (or dies) when training reaches a step."""

from __future__ import annotations

import os
import signal
import time

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """At the start of the batch after optimizer step ``step``: ``os.kill(getpid(), signal)``, or raise (a crash).

    ``"SIGINT-twice"`` sends SIGINT twice, 50 ms apart, before the batch trains: no step boundary lies between.
    """

    def __init__(self, step: int, signal_name: str = "SIGTERM"):
        self.step, self.signal_name, self.sent = step, signal_name, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.sent or trainer.global_step != self.step:
            return
        self.sent = True
        if self.signal_name == "crash":
            raise RuntimeError(f"crash at step {self.step}")
        if self.signal_name == "SIGINT-twice":  # a person pressing Ctrl-C twice, 50 ms apart, mid-step
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            return
        os.kill(os.getpid(), getattr(signal, self.signal_name))
