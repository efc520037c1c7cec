"""Checkpoints a kill cannot corrupt: atomic writes, and ``last.ckpt`` every N steps and/or every few minutes."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from ..packages import check_same_package

if TYPE_CHECKING:
    import pytorch_lightning as pl


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, then ``os.replace``\\ s it in.

    Lightning's own save goes through ``fsspec``, which for a local path writes to the system
    temporary folder and then *moves* the file: across file systems (``/tmp`` on another disk
    than the run directory) that is a copy, and a kill during the copy leaves a truncated file
    where the previous good checkpoint was. Here the bytes go to ``.<name>.tmp-<pid>`` next to
    the target, are flushed to disk, and a single rename swaps them in: a reader (or a resume)
    sees the old file or the new one, never half of one. Remote paths (``s3://``...) go to
    Lightning's own writer.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> AtomicCheckpointIO().save_checkpoint({"step": 3}, folder / "last.ckpt")
        >>> sorted(p.name for p in folder.iterdir()), torch.load(folder / "last.ckpt")["step"]
        (['last.ckpt'], 3)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's transaction
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, target)
        finally:
            temporary.unlink(missing_ok=True)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a writer killed mid-write
            stale.unlink(missing_ok=True)


def use_atomic_io(trainer: pl.Trainer) -> None:
    """Make the trainer's strategy write checkpoints with :class:`AtomicCheckpointIO`.

    Only a plain ``TorchCheckpointIO`` (of either Lightning package) is replaced: a user's own
    checkpoint IO (or a sharded strategy's) is left alone.
    """
    strategy = trainer.strategy
    if type(strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
        strategy.checkpoint_io = AtomicCheckpointIO()


class StepCheckpointBase:
    """Writes ``last.ckpt`` mid-epoch: every ``every_n_steps`` optimizer steps and/or every ``every_minutes``.

    An epoch-end ``last.ckpt`` loses the partial epoch to a kill -9, a node failure or a
    preemption; this one loses at most ``every_n_steps`` steps or ``every_minutes`` minutes,
    whichever comes first (``None`` turns either off). Saves happen at the end of a training
    batch that stepped the optimizer (never inside gradient accumulation, whose gradients a
    checkpoint lacks, nor on an epoch's last batch, where the epoch-end checkpoint follows), the point
    Lightning resumes mid-epoch from, and are atomic (:class:`AtomicCheckpointIO`). All ranks
    take the same decision (the time one is agreed with one small collective), so no rank waits.

    Args:
        dirpath: folder of the checkpoint.
        filename: file name; ``last.ckpt`` so ``ckpt_path=last`` / ``ckpt_path=auto`` resume it.
        every_n_steps: save after every this many optimizer steps (``None``: off).
        every_minutes: save when this many minutes passed since the last save (``None``: off).

    The callback is ``composites.training.StepCheckpoint`` (``pytorch_lightning``) or
    ``composites.training.lightning.StepCheckpoint``.

    Example:
        >>> from composites.training import StepCheckpoint
        >>> StepCheckpoint("/tmp/run/checkpoints", every_n_steps=500, every_minutes=10).path
        PosixPath('/tmp/run/checkpoints/last.ckpt')
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        filename: str = "last.ckpt",
        every_n_steps: int | None = 500,
        every_minutes: float | None = 10.0,
    ):
        for key, value in (("every_n_steps", every_n_steps), ("every_minutes", every_minutes)):
            if value is not None and value <= 0:
                raise ValueError(
                    f"StepCheckpoint: {key}={value} must be positive, or null to turn it off "
                    f"(callbacks.step_checkpoint.{key})"
                )
        self.path = Path(dirpath) / filename
        self.every_n_steps = every_n_steps
        self.every_minutes = every_minutes
        self._saved_step = -1
        self._saved_at = time.monotonic()
        self._step_at_start = -1  # global step when the current training batch began

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_same_package(self, trainer)
        use_atomic_io(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._saved_step = trainer.global_step
        self._saved_at = time.monotonic()

    def _due(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step
        if step == self._saved_step:  # no optimizer step since (accumulation, or a save just now)
            return False
        if self.every_n_steps and step % self.every_n_steps == 0:
            return True
        if self.every_minutes is None:
            return False
        late = time.monotonic() - self._saved_at >= 60 * self.every_minutes
        if trainer.world_size > 1:
            # clocks differ between ranks, so the answer is agreed by a collective: only on the steps
            # Lightning logs, not on every step (a few steps late on a 10-minute cadence costs nothing)
            if step % max(1, trainer.log_every_n_steps) != 0:
                return False
            late = trainer.strategy.reduce_boolean_decision(late, all=False)
        return late

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        stepped = trainer.global_step != self._step_at_start  # else mid-accumulation: same on every rank
        if trainer.is_last_batch or trainer.sanity_checking or not stepped or not self._due(trainer):
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state: a resume needs it
        self._saved_step = trainer.global_step
        self._saved_at = time.monotonic()
