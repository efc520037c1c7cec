"""The gradient-flow table: one row per sub-model with its counts, gradient norm and status."""

from __future__ import annotations

from ..guard import text_table
from .flow_tree import FlowNode


def rows(tree: FlowNode) -> list[FlowNode]:
    """The table's rows: every leaf, and every container with parameters of its own, in forward order.

    Example:
        >>> from torch import nn
        >>> from composites import Parallel
        >>> from composites.views.flow_tree import build_tree
        >>> [n.label for n in rows(build_tree(Parallel({"a": nn.Linear(2, 2), "b": nn.ReLU()})))]
        ['a', 'b']
    """
    return [n for n in tree.walk() if not n.children or n.parameters]


def _count(numel: int) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if numel >= size:
            return f"{numel / size:.1f}{unit}"
    return str(numel)


def format_norm(norm: float | None) -> str:
    """A gradient norm for tables and plots: ``-`` when there is none.

    Example:
        >>> format_norm(None), format_norm(0.123456), format_norm(3e-7)
        ('-', '0.123', '3.00e-07')
    """
    return "-" if norm is None else f"{norm:.3g}" if 1e-3 <= abs(norm) < 1e4 or norm == 0 else f"{norm:.2e}"


def format_flow(tree: FlowNode) -> str:
    """The per-sub-model table: name, type, size, parameter counts, gradient norm, status.

    ``parameters``, ``trainable``, ``frozen`` and ``inactive`` count parameter tensors (as the
    guard does); ``size`` counts their elements.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from composites import GradientGuard, Sequential
        >>> from composites.views import gradient_flow
        >>> model = Sequential({"encoder": nn.Linear(3, 4), "head": nn.Linear(4, 2)})
        >>> model.encoder.requires_grad_(False)  # doctest: +ELLIPSIS
        Linear(...)
        >>> guard = GradientGuard(model)
        >>> model(torch.randn(5, 3)).sum().backward()
        >>> print(format_flow(gradient_flow(guard, guard.check())))  # doctest: +NORMALIZE_WHITESPACE +ELLIPSIS
        sub-model  type    size  parameters  trainable  frozen  inactive  grad norm  status
        encoder    Linear  16    2           0          2       0         -          frozen
        head       Linear  10    2           2          0       0         ...        ok
    """
    header = ("sub-model", "type", "size", "parameters", "trainable", "frozen", "inactive", "grad norm", "status")
    table = [
        (
            n.label,
            n.kind,
            _count(n.numel),
            str(n.parameters),
            str(n.trainable),
            str(n.frozen),
            str(n.inactive),
            format_norm(n.grad_norm),
            n.status,
        )
        for n in rows(tree)
    ]
    return text_table(header, table)
