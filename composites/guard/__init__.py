"""The gradient guard: per-backward hooks, the check, replay and diagnosis, the report; torch only."""

from .gradient_guard import GradientGuard
from .inactive import STARVED_AFTER
from .problems import CAUSES, GradientFlowError, GuardReport, Problem, format_table
from .step import RecordedCall, StepRecord
from .structure import COMPOSITES, grouped_grad_norms, submodel_grad_norms, submodel_names
from .table import text_table

__all__ = [
    "GradientGuard",
    "GradientFlowError",
    "GuardReport",
    "Problem",
    "CAUSES",
    "format_table",
    "COMPOSITES",
    "grouped_grad_norms",
    "submodel_grad_norms",
    "submodel_names",
    "STARVED_AFTER",
    "StepRecord",
    "RecordedCall",
    "text_table",
]
