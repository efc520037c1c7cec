"""composites: build models out of other models and train them without silent gradient bugs.

The subpackages, one concern each: ``modules`` (Sequential, Parallel, Conditional and routing),
``guard`` (the gradient guard), ``training`` (Lightning), ``views`` (tables and pictures),
``presets`` (the example models and data the configs use).
"""

from .guard import CAUSES, GradientFlowError, GradientGuard, GuardReport, Problem, submodel_grad_norms
from .lazy import lazy_getattr
from .modules import Conditional, Parallel, Sequential, StageError
from .views import FlowNode, check_gradient_flow, format_flow, gradient_flow

# Lightning and matplotlib are heavy to import: these load on first use, so the composites and
# the guard stay quick to import (spawned DDP workers, scripts, tests).
_LAZY = {
    "CompositeModule": "training.module",
    "DigitsDataModule": "presets.data",
    "draw_flow_tree": "views.tree_plot",
    "GradNormPlot": "training.grad_norm_callback",
    "GradientGuardCallback": "training.guard_callback",
    "plot_grad_norms": "views.grad_norm_plot",
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
    "submodel_grad_norms",
    *_LAZY,
]

__getattr__ = lazy_getattr(__name__, _LAZY)
