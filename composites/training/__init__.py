"""The Lightning side: the module, its callbacks, optimizer groups, epoch logging, strategy set-up.

Importing this package imports no Lightning: each name loads on first use, so ``composites.X(...)``
can build the class of the Lightning package the program imported (see :mod:`.flavours`).
To add a name, add it to ``_LAZY`` (name -> module in this package).
"""

from ..lazy import lazy_getattr
from .flavours import Flavoured, chosen_package, package_of, using_lightning
from .guard_callback import GUARD_MODES, GradientGuardCallback, GuardMode
from .non_finite import NonFiniteCheckpointError, NonFiniteStepsError

_LAZY = {
    "AtomicCheckpointIO": "checkpoints",
    "StepCheckpoint": "checkpoints",
    "SignalCheckpoint": "signals",
    "TrainingInterrupted": "signals",
    "CompositeModule": "module",
    "ResumableLoader": "resumable_loader",
    "ResumeState": "resume_state",
    "GradNormPlot": "grad_norm_callback",
    "FreezeSubmodels": "freeze",
    "FSDP2Strategy": "fsdp2_strategy",
    "ExpertParallelStrategy": "strategies.expert_parallel",
    "TerminalProgress": "run_output",
    "quiet_lightning": "run_output",
    "route_lightning_logs": "run_output",
}

__all__ = [
    "GUARD_MODES",
    "GuardMode",
    "GradientGuardCallback",
    "NonFiniteCheckpointError",
    "NonFiniteStepsError",
    "chosen_package",
    "Flavoured",
    "package_of",
    "using_lightning",
    *_LAZY,
]

__getattr__ = lazy_getattr(__name__, _LAZY)
