"""A callback the cluster tests add to a job (``+callbacks.marks._target_=tests.cluster.step_marks.StepMarks``).

Rank zero prints ``step <global step>`` after each optimizer step, so a test reading the job log
knows how far training got and, across a requeue, which steps ran in which leg. ``sleep_s`` slows
the steps down so a test can signal the job in the middle of an epoch; with ``sleepy_legs`` only
the job's first legs sleep (SLURM sets ``SLURM_RESTART_COUNT`` in a requeued one), so a test that
signals N times does not wait out the rest of the run at that pace (``first_leg_only``: one leg).
"""

from __future__ import annotations

import os
import time

import pytorch_lightning as pl


class StepMarks(pl.Callback):
    """Print ``step N`` (rank zero) after every training batch, then sleep ``sleep_s``."""

    def __init__(self, sleep_s: float = 0.0, first_leg_only: bool = False, sleepy_legs: int | None = None):
        self.sleep_s = sleep_s
        if first_leg_only:
            sleepy_legs = 1
        if sleepy_legs is not None and int(os.environ.get("SLURM_RESTART_COUNT", "0")) >= sleepy_legs:
            self.sleep_s = 0.0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if trainer.is_global_zero:
            print(f"step {trainer.global_step}", flush=True)
        time.sleep(self.sleep_s)
