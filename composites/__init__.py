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
]
