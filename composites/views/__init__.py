"""Pictures and tables of a model's gradient flow. The PNG writers import matplotlib on first use."""

import importlib

from .flow import FlowNode, check_gradient_flow, format_flow, gradient_flow

_LAZY = {"draw_flow_tree": "tree_plot", "plot_grad_norms": "grad_norm_plot"}

__all__ = ["FlowNode", "check_gradient_flow", "format_flow", "gradient_flow", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'composites.views' has no attribute '{name}'")
