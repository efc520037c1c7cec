"""Pictures and tables of a model's gradient flow. The PNG writers import matplotlib on first use."""

from ..guard import text_table
from .flow import check_gradient_flow, gradient_flow
from .flow_table import format_flow, format_norm, rows
from .flow_tree import FlowNode, build_tree

__all__ = [
    "FlowNode",
    "build_tree",
    "check_gradient_flow",
    "format_flow",
    "format_norm",
    "gradient_flow",
    "rows",
    "text_table",
    "draw_flow_tree",
    "plot_grad_norms",
]


def __getattr__(name: str):
    if name == "draw_flow_tree":  # matplotlib is slow to import: only when a picture is drawn
        from .tree_plot import draw_flow_tree

        return draw_flow_tree
    if name == "plot_grad_norms":
        from .grad_norm_plot import plot_grad_norms

        return plot_grad_norms
    raise AttributeError(f"module '{__name__}' has no attribute '{name}'")
