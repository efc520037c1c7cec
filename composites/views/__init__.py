"""Pictures and tables of a model's gradient flow. The PNG writers import matplotlib on first use."""

from ..guard import text_table
from ..lazy import lazy_getattr
from .flow import check_gradient_flow, gradient_flow
from .flow_table import format_flow, format_norm, rows
from .flow_tree import FlowNode, build_tree

_LAZY = {"draw_flow_tree": "tree_plot", "plot_grad_norms": "grad_norm_plot"}

__all__ = [
    "FlowNode",
    "build_tree",
    "check_gradient_flow",
    "format_flow",
    "format_norm",
    "gradient_flow",
    "rows",
    "text_table",
    *_LAZY,
]

__getattr__ = lazy_getattr(__name__, _LAZY)
