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


FIT_STOPPED = "`Trainer.fit` stopped"  # Lightning's closing line of a fit, said before its last epoch's line
RANK_ZERO_LOGGERS = ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero")


class HoldFitStopped(logging.Filter):
    """Holds Lightning's "`Trainer.fit` stopped" records back until :meth:`release` (after the last epoch's line).

    Lightning says it when it checks whether to start another epoch, which comes before the
    epoch's metrics are final, so an epoch line written after it would read out of order.

    >>> hold = HoldFitStopped()
    >>> record = logging.LogRecord("pytorch_lightning.utilities.rank_zero", logging.INFO, "", 0, FIT_STOPPED, None, None)
    >>> hold.filter(record), len(hold.held)
    (False, 1)
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(FIT_STOPPED):
            self.held.append(record)
            return False
        return True

    def install(self) -> None:
        for name in RANK_ZERO_LOGGERS:
            logging.getLogger(name).addFilter(self)

    def release(self) -> None:
        """Take the filter off and say what it held, in order."""
        for name in RANK_ZERO_LOGGERS:
            logging.getLogger(name).removeFilter(self)
        held, self.held = self.held, []
        for record in held:
            logging.getLogger(record.name).handle(record)


def epoch_label(epoch: int, max_epochs: int | None) -> str:
    """An epoch as Lightning's progress bar, its CSV logs and checkpoint names count it: from 0.

    >>> epoch_label(2, 3), epoch_label(4, -1)
    ('Epoch 2/2', 'Epoch 4')
    """
    return f"Epoch {epoch}/{max_epochs - 1}" if max_epochs is not None and max_epochs >= 0 else f"Epoch {epoch}"


def to_log_files(record: logging.LogRecord) -> None:
    """Hand ``record`` to the root logger's file handlers only (a terminal shows the bar instead)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


class TerminalProgressBase:
    """A progress bar on terminals only; elsewhere one log line per epoch (no ``\\r`` flood in SLURM/CI logs).

    Every epoch's line goes to the run's log file (Hydra's ``train.log``) either way; on a terminal
    it goes only there, the bar shows the epoch on screen. The line counts epochs as the bar does
    (``Epoch 2/2`` is the third of three, as in the CSV logs and the checkpoint names), and it comes
    before Lightning's "`Trainer.fit` stopped" line.

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
        self.hold = HoldFitStopped()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_same_package(self, trainer)
        quiet_lightning()
        bar = trainer.progress_bar_callback
        if bar is not None and not self.interactive:
            bar.disable()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.hold.install()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.hold.release()  # Lightning calls no teardown hook then: whatever was held is still said

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.hold.release()

    # Lightning updates callback_metrics after every on_train_epoch_end hook: the line for an epoch
    # is written when the next one starts, or when training ends.
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self.pending_epoch = trainer.current_epoch

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_line(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_line(trainer)
        self.hold.release()

    def _epoch_line(self, trainer: Any) -> None:
        done = self.pending_epoch
        self.pending_epoch = None
        if done is None:
            return
        # every rank reads the metrics: a val/test mean computes across ranks on first read
        values = {k: v for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        keys = [k for k in values if not k.startswith(("grad_norm/", "lr/")) and not k.endswith("_step")]
        keys = [k for k in keys if not (k.endswith("_epoch") and k[: -len("_epoch")] in values)]
        if not trainer.is_global_zero:
            return
        shown = "  ".join(f"{k} {float(values[k]):.4f}" for k in sorted(keys))
        line = f"{epoch_label(done, trainer.max_epochs)}  step {trainer.global_step}  {shown}"
        if self.interactive:
            to_log_files(log.makeRecord(log.name, logging.INFO, __file__, 0, line, None, None))
        else:
            log.info(line)
