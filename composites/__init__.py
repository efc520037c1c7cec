"""composites: build models out of other models and train them without silent gradient bugs."""

from .conditional import Conditional
from .guard import GradientGuard
from .parallel import Parallel
from .problems import CAUSES, GradientFlowError, GuardReport, Problem
from .sequential import Sequential, StageError

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
]


def __getattr__(name: str):
    # Lightning is heavy to import: load it only when CompositeModule is asked for, so the
    # composites and the guard stay quick to import (spawned DDP workers, scripts, tests).
    if name == "CompositeModule":
        from .lightning_module import CompositeModule

        return CompositeModule
    raise AttributeError(f"module 'composites' has no attribute '{name}'")
