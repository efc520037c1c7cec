"""The one place that routes Lightning's logs: its noise silenced, its records in the run's log file.

- :func:`quiet_lightning` drops what every run printed and no run needs: the litlogger/litmodels
  tips, the "srun is available but not used" hint outside SLURM jobs, the pytree ``LeafSpec``
  deprecation (Lightning's, not the user's), and the "multiple ModelCheckpoint" warning of
  ``test(ckpt_path="best")`` (the first checkpoint callback is the best one by design; the others
  are composites' last/step/signal checkpoints).
- :func:`route_lightning_logs` sends Lightning's log records to the root logger, so a file handler
  there (Hydra's ``train.log``) gets them: Lightning gives its loggers their own console handler
  and stops propagation when imported before logging is configured.

The Hydra side calls both when a job starts (``composites_hydra.run_output.RunOutput``); the
``TerminalProgress`` callback calls :func:`quiet_lightning` in ``setup``.
"""

from __future__ import annotations

import logging
import warnings

NOISE = (  # (warning message regex, why it is noise)
    (r"The `srun` command is available on your system but is not used", "not a SLURM job: nothing to do"),
    (r".*isinstance\(treespec, LeafSpec\)` is deprecated", "inside Lightning, not the user's code"),
    (r".*called with Trainer configured with multiple `ModelCheckpoint`", "the first one is the best by design"),
    (r"Checkpoint directory .* exists and is not empty", "a resume writes on into its own run's folder"),
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
