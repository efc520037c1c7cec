"""composites: build models out of other models and train them without silent gradient bugs."""

import importlib

from .conditional import Conditional
from .gradient_flow import FlowNode, check_gradient_flow, format_flow, gradient_flow
from .guard import GradientGuard
from .parallel import Parallel
from .problems import CAUSES, GradientFlowError, GuardReport, Problem
from .sequential import Sequential, StageError

# Lightning and matplotlib are heavy to import: these load on first use, so the composites and
# the guard stay quick to import (spawned DDP workers, scripts, tests).
_LAZY = {
    "CompositeModule": "lightning_module",
    "DigitsDataModule": "data",
    "draw_flow_tree": "tree_plot",
    "GradNormPlot": "grad_norm_callback",
    "plot_grad_norms": "grad_norm_callback",
    "submodel_grad_norms": "grad_norm_callback",
}

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
    "FlowNode",
    "check_gradient_flow",
    "format_flow",
    "gradient_flow",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'composites' has no attribute '{name}'")
