"""The Lightning side: the module, its callbacks, strategies, optimizer groups, epoch logging.

Rooms: ``module.py`` (``CompositeModuleBase`` and its helpers), ``callbacks/``, ``strategies/``,
``logs.py`` (Lightning's logs), ``packages.py`` (the two Lightning packages). Each Lightning class is
written once as a base class and declared per package in :mod:`.pytorch_lightning` and
:mod:`.lightning`. ``composites.training.<Name>`` are the ``pytorch_lightning`` classes, imported
on first use: importing this package imports no Lightning.
"""

from .callbacks.non_finite import NonFiniteCheckpointError, NonFiniteStepsError
from .guard_modes import GUARD_MODES, GuardMode
from .logs import quiet_lightning, route_lightning_logs
from .packages import LIGHTNING_CLASSES, lightning_api, package_of
from .resumable_loader import ResumableLoader

__all__ = [
    *LIGHTNING_CLASSES,  # the pytorch_lightning classes (composites.training.lightning has the lightning ones)
    "AtomicCheckpointIO",
    "TrainingInterrupted",
    "GUARD_MODES",
    "GuardMode",
    "NonFiniteCheckpointError",
    "NonFiniteStepsError",
    "ResumableLoader",
    "lightning_api",
    "package_of",
    "quiet_lightning",
    "route_lightning_logs",
]


def __getattr__(name: str):
    # Lightning is slow to import: the classes that need it load when first asked for
    if name == "AtomicCheckpointIO":
        from .callbacks.checkpoints import AtomicCheckpointIO

        return AtomicCheckpointIO
    if name == "TrainingInterrupted":
        from .callbacks.signal_checkpoint import TrainingInterrupted

        return TrainingInterrupted
    if name in LIGHTNING_CLASSES:
        from . import pytorch_lightning

        return getattr(pytorch_lightning, name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
