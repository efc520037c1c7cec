"""Gradient flow per sub-model: the composite's tree, each sub-model's status, and a table of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..guard import COMPOSITES, GradientGuard, GuardReport
from ..modules import Conditional, Parallel, Sequential

STATUSES = ("ok", "frozen", "inactive", "problem", "no params")


@dataclass
class FlowNode:
    """One box of the tree: a sub-model (leaf) or a container (a composite, or the model).

    Leaves own every parameter below them; a container owns only its direct parameters (a
    composite usually has none). ``status`` is ``"ok"``, ``"frozen"`` (every parameter has
    ``requires_grad=False``), ``"inactive"`` (a Conditional branch routed out), the guard's
    cause(s) (``"detached"``, ``"unused, no_grad"``, ...), ``"no params"``, or ``""`` for a
    container without parameters of its own.

    Example:
        >>> node = FlowNode("fuse.flat", "MLP", role="branch", parameters=4, trainable=4, causes=("detached",), status="detached")
        >>> node.name, node.label, node.category
        ('flat', 'fuse.flat', 'problem')
    """

    path: str
    kind: str
    role: str = ""
    detail: str = ""
    children: list[FlowNode] = field(default_factory=list)
    parameters: int = 0
    numel: int = 0
    trainable: int = 0
    frozen: int = 0
    inactive: int = 0
    grad_norm: float | None = None
    causes: tuple[str, ...] = ()
    status: str = ""

    @property
    def name(self) -> str:
        """The last part of the path (``"model"`` for the root)."""
        return self.path.rsplit(".", 1)[-1] if self.path else "model"

    @property
    def label(self) -> str:
        """The qualified name as the guard prints it (``"(model)"`` for the root)."""
        return self.path or "(model)"

    @property
    def category(self) -> str:
        """The status as one of :data:`STATUSES` (all causes are ``"problem"``), or ``""``."""
        return "problem" if self.causes else self.status

    def walk(self) -> Iterator[FlowNode]:
        """This node and all below it, depth first, in forward order."""
        yield self
        for child in self.children:
            yield from child.walk()


def _contains_composite(module: nn.Module) -> bool:
    return any(isinstance(m, COMPOSITES) for m in module.modules())


def _describe(module: nn.Module) -> str:
    if isinstance(module, Sequential):
        return f"{len(module.stage_names)} stages"
    if isinstance(module, Parallel):
        return f"combine={module.combine_name}"
    if isinstance(module, Conditional):
        return module.extra_repr()
    return ""


def _role(parent: nn.Module, name: str) -> str:
    if isinstance(parent, Sequential):
        return f"stage {parent.stage_names.index(name) + 1}"
    if isinstance(parent, (Parallel, Conditional)):
        return "branch" if name in parent.branch_names else name  # "router" / "combiner"
    return ""


def build_tree(model: nn.Module) -> FlowNode:
    """The composite's tree: composites (and modules holding one) open up, the rest are leaves.

    A plain ``nn.Module`` gives the model and its top-level children.

    Example:
        >>> from torch import nn
        >>> from composites import Parallel, Sequential
        >>> model = Sequential({"fuse": Parallel({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}), "head": nn.Linear(4, 1)})
        >>> [(n.path, n.kind, n.role) for n in build_tree(model).walk()]
        [('', 'Sequential', 'model'), ('fuse', 'Parallel', 'stage 1'), ('fuse.a', 'Linear', 'branch'), ('fuse.b', 'Linear', 'branch'), ('head', 'Linear', 'stage 2')]
    """

    def node(module: nn.Module, path: str, role: str, is_root: bool) -> FlowNode:
        result = FlowNode(path, type(module).__name__, role, _describe(module))
        if is_root or _contains_composite(module):
            for name, child in module.named_children():
                child_path = f"{path}.{name}" if path else name
                result.children.append(node(child, child_path, _role(module, name), False))
        return result

    return node(model, "", "model", True)


def _owner(nodes: dict[str, FlowNode], name: str) -> FlowNode:
    """The node that owns a parameter (or attribute) path: the longest node path that prefixes it."""
    parts = name.split(".")[:-1]
    for k in range(len(parts), 0, -1):
        found = nodes.get(".".join(parts[:k]))
        if found is not None:
            return found
    return nodes[""]


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
    grads: dict[str, list[Tensor]] = {}
    for name, p in zip(guard.names, guard.params):
        owner = _owner(nodes, name)
        owner.parameters += 1
        owner.numel += p.numel()
        owner.frozen += name in frozen
        owner.trainable += name not in frozen
        owner.inactive += name in inactive
        if p.grad is not None:
            grads.setdefault(owner.path, []).append(p.grad.detach())
    for path, gs in grads.items():
        nodes[path].grad_norm = float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(gs))))
    for problem in report.problems:
        owner = _owner(nodes, problem.parameter)
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


def rows(tree: FlowNode) -> list[FlowNode]:
    """The table's rows: every leaf, and every container with parameters of its own, in forward order.

    Example:
        >>> from torch import nn
        >>> from composites import Parallel
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
    table = [header] + [
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
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)


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
        >>> report.ok, [(n.label, n.status) for n in rows(tree)]
        (True, [('a', 'ok'), ('b', 'ok')])
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
