"""Output a person can live with: Lightning's noise silenced, its log in the run's log file, no progress-bar flood.

- :func:`quiet_lightning` drops what every run printed and no run needs: the litlogger/litmodels
  tips, the "srun is available but not used" hint outside SLURM jobs, the pytree ``LeafSpec``
  deprecation (Lightning's, not the user's), and the "multiple ModelCheckpoint" warning of
  ``test(ckpt_path="best")`` (the first checkpoint callback is the best one by design; the others
  are composites' last/step/signal checkpoints).
- :func:`route_lightning_logs` sends Lightning's log records to the root logger, so a file handler
  there (Hydra's ``train.log``) gets them: Lightning gives its loggers their own console handler
  and stops propagation when imported before logging is configured.
- :class:`TerminalProgress` keeps the progress bar for terminals; elsewhere (SLURM, CI, a pipe) it
  turns the bar off and logs one line per epoch instead.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from .flavours import Flavoured

log = logging.getLogger("composites")

NOISE = (  # (warning message regex, why it is noise)
    (r"The `srun` command is available on your system but is not used", "not a SLURM job: nothing to do"),
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated", "inside Lightning, not the user's code"),
    (r".*called with Trainer configured with multiple `ModelCheckpoint`", "the first one is the best by design"),
)
TIPS = ("💡 Tip:",)
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
_RANK_ZERO_LOGGERS = tuple(f"{name}.utilities.rank_zero" for name in LIGHTNING_LOGGERS[1:])


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(TIPS)


def quiet_lightning() -> None:
    """Silence Lightning's noise (see the module docstring); safe to call more than once.

    >>> quiet_lightning(); quiet_lightning()
    >>> sum(isinstance(f, _NoTips) for f in logging.getLogger("lightning_fabric.utilities.rank_zero").filters)
    1
    """
    for message, _ in NOISE:
        warnings.filterwarnings("ignore", message=message)
    for name in _RANK_ZERO_LOGGERS:  # rank_zero_info logs through one of these, whichever was imported last
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


def route_lightning_logs() -> None:
    """Let Lightning's log records reach the root logger's handlers (a run's log file), once each.

    Does nothing while the root logger has no handler (plain Python, no logging configured).
    """
    if not logging.getLogger().handlers:
        return
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:  # the console handler Lightning added itself
                logger.removeHandler(handler)
        logger.propagate = True


def is_terminal() -> bool:
    """Whether the progress bar's stream (stderr) is an interactive terminal."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class TerminalProgress(Flavoured):
    """A progress bar on terminals only; elsewhere one log line per epoch (no ``\\r`` flood in SLURM/CI logs).

    Args:
        interactive: ``None`` detects it (stderr is a terminal); ``True``/``False`` forces it.

    Example:
        >>> TerminalProgress(interactive=False).interactive
        False
    """

    lightning_base = "Callback"

    def __init__(self, interactive: bool | None = None):
        self.interactive = is_terminal() if interactive is None else interactive

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self.check_trainer(trainer)
        quiet_lightning()
        bar = trainer.progress_bar_callback
        if bar is not None and not self.interactive:
            bar.disable()

    # Lightning updates callback_metrics after every on_train_epoch_end hook: the line for an epoch
    # is written when the next one starts, or when training ends.
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not (self.interactive or trainer.sanity_checking):
            self._pending = trainer.current_epoch + 1  # the epoch just done, counted from 1

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_line(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._epoch_line(trainer)

    def _epoch_line(self, trainer: Any) -> None:
        done, self._pending = getattr(self, "_pending", None), None
        if done is None:
            return
        values = {k: v for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1}
        keys = [k for k in values if not k.startswith(("grad_norm/", "lr/")) and not k.endswith("_step")]
        keys = [k for k in keys if not (k.endswith("_epoch") and k[: -len("_epoch")] in values)]
        if trainer.is_global_zero:
            shown = "  ".join(f"{k} {float(values[k]):.4f}" for k in sorted(keys))
            log.info(f"epoch {done}/{trainer.max_epochs}  step {trainer.global_step}  {shown}")
