"""Gradient flow per sub-model: fill the composite's tree with what one guard check found."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..guard import GradientGuard, GuardReport, grouped_grad_norms
from .flow_tree import FlowNode, build_tree, owner_node


def gradient_flow(guard: GradientGuard, report: GuardReport) -> FlowNode:
    """Fill the model's tree with what one :meth:`GradientGuard.check` found, per sub-model.

    Call it after the check and before the gradients are zeroed: gradient norms are read
    from the parameters' current ``.grad``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from composites import GradientGuard, Sequential
        >>> class Cut(nn.Module):
        ...     def forward(self, x):
        ...         return x.detach()
        >>> model = Sequential({"encoder": nn.Linear(3, 4), "cut": Cut(), "head": nn.Linear(4, 2)})
        >>> guard = GradientGuard(model)
        >>> model(torch.randn(5, 3)).sum().backward()
        >>> tree = gradient_flow(guard, guard.check(raise_error=False))
        >>> [(n.label, n.status) for n in tree.walk()]
        [('(model)', ''), ('encoder', 'detached'), ('cut', 'no params'), ('head', 'ok')]
    """
    root = build_tree(guard.model)
    nodes = {n.path: n for n in root.walk()}
    leaves = {n.path for n in root.walk() if not n.children}
    frozen, inactive = set(report.frozen_names), set(report.inactive_names)
    owners: dict[str, str] = {}
    for name, p in zip(guard.names, guard.params):
        owner = owner_node(nodes, name)
        owners[name] = owner.path
        owner.parameters += 1
        owner.numel += p.numel()
        owner.frozen += name in frozen
        owner.trainable += name not in frozen
        owner.inactive += name in inactive
    for path, norm in grouped_grad_norms(zip(guard.names, guard.params), owners, root="").items():
        nodes[path].grad_norm = norm
    for problem in report.problems:
        owner = owner_node(nodes, problem.parameter)
        if problem.cause not in owner.causes:
            owner.causes += (problem.cause,)
    for n in nodes.values():
        if n.causes:
            n.status = ", ".join(n.causes)
        elif n.parameters and not n.trainable:
            n.status = "frozen"
        elif n.trainable and n.inactive == n.trainable:
            n.status = "inactive"
        elif n.parameters:
            n.status = "ok"
        elif n.path in leaves:
            n.status = "no params"
    return root


def check_gradient_flow(
    model: nn.Module,
    loss: Callable[[Any, Any], Tensor],
    batch: tuple[Any, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[FlowNode, GuardReport]:
    """Run one forward/backward of ``loss(model(input), target)`` and check the gradient flow.

    The model is put in training mode and its gradients are reset first; a temporary
    :class:`GradientGuard` (given ``optimizer``, it also reports parameters the optimizer
    misses) checks the backward and is removed afterwards. Nothing steps.

    Args:
        model: the model (a composite or any ``nn.Module``).
        loss: ``(output, target) -> scalar``.
        batch: ``(input, target)``; the input is passed to the model as one argument.
        optimizer: the optimizer training would use, if any.

    Returns:
        ``(tree, report)``: the tree with each sub-model's status (see :func:`gradient_flow`)
        and the guard's report (``report.ok`` is False when something did not train).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from composites import Parallel
        >>> model = Parallel({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}, combine="sum")
        >>> tree, report = check_gradient_flow(model, nn.MSELoss(), (torch.randn(4, 3), torch.zeros(4, 2)))
        >>> report.ok, [(n.label, n.status) for n in tree.walk()]
        (True, [('(model)', ''), ('a', 'ok'), ('b', 'ok')])
    """
    model.train()
    model.zero_grad(set_to_none=True)
    guard = GradientGuard(model, optimizer)
    try:
        x, y = batch
        value = loss(model(x), y)
        value.backward()
        report = guard.check(raise_error=False, loss=value.detach())
        return gradient_flow(guard, report), report
    finally:
        guard.remove()
