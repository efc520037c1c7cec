"""The composite's tree of sub-models, as the gradient-flow table and picture show it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from torch import nn

from ..guard import COMPOSITES
from ..modules import Conditional, Parallel, Sequential, enclosing, join_name

STATUSES = ("ok", "frozen", "inactive", "problem", "no params")


@dataclass
class FlowNode:
    """One box of the tree: a sub-model (leaf) or a container (a composite, or the model).

    Leaves own every parameter below them; a container owns only its direct parameters (a
    composite usually has none). ``status`` is ``"ok"``, ``"frozen"`` (every parameter has
    ``requires_grad=False``), ``"inactive"`` (a Conditional branch routed out, or may-skip
    parameters without a gradient), the guard's cause(s) (``"detached"``, ``"unused,
    no_grad"``, ``"starved"``, ...), ``"no params"``, or ``""`` for a container without
    parameters of its own.

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
                child_path = join_name(path, name)
                result.children.append(node(child, child_path, _role(module, name), False))
        return result

    return node(model, "", "model", True)


def owner_node(nodes: dict[str, FlowNode], name: str) -> FlowNode:
    """The node that owns a parameter (or attribute) name: the innermost node path that holds it.

    Example:
        >>> nodes = {"": FlowNode("", "Sequential"), "encoder": FlowNode("encoder", "MLP")}
        >>> owner_node(nodes, "encoder.fc.weight").path, owner_node(nodes, "scale").label
        ('encoder', '(model)')
    """
    return next((nodes[p] for p in enclosing(name) if p in nodes), nodes[""])
