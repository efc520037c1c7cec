"""A progress bar on terminals only; elsewhere (SLURM, CI, a pipe) one log line per epoch instead of a ``\\r`` flood."""

from __future__ import annotations

import logging
import sys
from typing import Any

from ..logs import quiet_lightning
from ..packages import check_same_package

log = logging.getLogger("composites")


def is_terminal() -> bool:
    """Whether the progress bar's stream (stderr) is an interactive terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class TerminalProgressBase:
    """A progress bar on terminals only; elsewhere one log line per epoch (no ``\\r`` flood in SLURM/CI logs).

    Args:
        interactive: ``None`` detects it (stderr is a terminal); ``True``/``False`` forces it.

    The callback is ``composites.training.TerminalProgress`` (``pytorch_lightning``) or
    ``composites.training.lightning.TerminalProgress``.

    Example:
        >>> from composites.training import TerminalProgress
        >>> TerminalProgress(interactive=False).interactive
        False
    """

    def __init__(self, interactive: bool | None = None):
        self.interactive = is_terminal() if interactive is None else interactive
        self.pending_epoch: int | None = None  # an epoch whose line is written when the next hook sees its metrics

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_same_package(self, trainer)
        quiet_lightning()
        bar = trainer.progress_bar_callback
        if bar is not None and not self.interactive:
            bar.disable()

    # Lightning updates callback_metrics after every on_train_epoch_end hook: the line for an epoch
    # is written when the next one starts, or when training ends.
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not (self.interactive or trainer.sanity_checking):
            self.pending_epoch = trainer.current_epoch + 1  # the epoch just done, counted from 1

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_line(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_line(trainer)

    def _epoch_line(self, trainer: Any) -> None:
        done = self.pending_epoch
        self.pending_epoch = None
        if done is None:
            return
        values = {k: v for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        keys = [k for k in values if not k.startswith(("grad_norm/", "lr/")) and not k.endswith("_step")]
        keys = [k for k in keys if not (k.endswith("_epoch") and k[: -len("_epoch")] in values)]
        if trainer.is_global_zero:
            shown = "  ".join(f"{k} {float(values[k]):.4f}" for k in sorted(keys))
            log.info(f"epoch {done}/{trainer.max_epochs}  step {trainer.global_step}  {shown}")
