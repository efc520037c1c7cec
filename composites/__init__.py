"""composites: build models out of other models and train them without silent gradient bugs.

The front door: the composites, the gradient guard and its report, ``CompositeModule`` and
``GradientGuardCallback`` (the ``pytorch_lightning`` classes, imported on first use so that
``import composites`` stays light). The rest comes from its subpackage, one concern each:
``composites.modules`` (composites and routing), ``composites.guard``, ``composites.training``
(Lightning: callbacks, strategies; ``composites.training.lightning`` for the unified ``lightning``
package), ``composites.views`` (tables and pictures), ``composites.presets`` (the example models
and data the configs use).
"""

from .guard import CAUSES, GradientFlowError, GradientGuard, GuardReport, Problem
from .modules import Conditional, Parallel, Sequential, StageError

__all__ = [
    "Sequential",
    "Parallel",
    "Conditional",
    "StageError",
    "GradientGuard",
    "GradientFlowError",
    "GuardReport",
    "Problem",
    "CAUSES",
    "CompositeModule",
    "GradientGuardCallback",
]


def __getattr__(name: str):
    if name in ("CompositeModule", "GradientGuardCallback"):  # Lightning is slow to import: only when asked for
        from .training import pytorch_lightning

        return getattr(pytorch_lightning, name)
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
