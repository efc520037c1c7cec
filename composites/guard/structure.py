"""What the guard reads off a model's structure: sub-model names and unregistered tensors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..modules import Conditional, Parallel, Sequential, enclosing, join_name
from .dtensors import is_sharded, whole_grad_norms
from .finite import stored

COMPOSITES = (Sequential, Parallel, Conditional)
_MODULE_STATE = frozenset(vars(nn.Module()))


def submodel_names(model: nn.Module, parameter_names: list[str]) -> dict[str, str]:
    """Map each parameter name to the sub-model that owns it.

    The sub-model is the deepest child of a composite on the parameter's path (a stage,
    branch, router or combiner, with the user's name); in a model without composites it is
    the module that holds the parameter. ``""`` is the model itself.

    Example:
        >>> from torch import nn
        >>> from composites import Sequential
        >>> m = Sequential({"encoder": nn.Sequential(nn.Linear(2, 2)), "head": nn.Linear(2, 1)})
        >>> submodel_names(m, ["encoder.0.weight", "head.bias"])
        {'encoder.0.weight': 'encoder', 'head.bias': 'head'}
    """
    children = {
        join_name(path, child)
        for path, module in model.named_modules()
        if isinstance(module, COMPOSITES)
        for child, _ in module.named_children()
    }
    result = {}
    for name in parameter_names:
        result[name] = next((p for p in enclosing(name) if p in children), name.rpartition(".")[0])
    return result


def find_unregistered(model: nn.Module) -> list[tuple[str, str]]:
    """Tensors with ``requires_grad=True`` held as plain module attributes.

    ``parameters()``, the optimizer and ``state_dict`` never see them, so they never train.
    Only leaf tensors count: a tensor computed from parameters (a cache) is not the bug.

    Returns:
        ``(attribute path, owning module path)`` pairs, e.g. ``("layer.scale", "layer")``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> layer = nn.Linear(2, 2)
        >>> layer.scale = torch.ones(2, requires_grad=True)
        >>> layer.gains = {"a": torch.ones(2, requires_grad=True)}
        >>> find_unregistered(nn.Sequential(layer))
        [('0.scale', '0'), ("0.gains['a']", '0')]
    """
    found = []
    for path, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in _MODULE_STATE:  # nn.Module's own dicts: registered parameters and buffers, hooks
                continue
            if isinstance(value, Mapping):
                items = [(f"[{key!r}]", item) for key, item in value.items()]
            elif isinstance(value, (list, tuple)):
                items = [(f"[{k}]", item) for k, item in enumerate(value)]
            else:
                items = [("", value)]
            for suffix, item in items:
                if (
                    isinstance(item, Tensor)
                    and not isinstance(item, nn.Parameter)
                    and item.requires_grad
                    and item.is_leaf
                ):
                    found.append((join_name(path, attr) + suffix, path))
    return found


def unregistered_tensors(model: nn.Module) -> list[tuple[str, str]]:
    """:func:`find_unregistered`, each with the sub-model that owns it, as the guard reports it.

    Example:
        >>> import torch
        >>> from composites import Sequential
        >>> layer = nn.Linear(2, 2)
        >>> layer.scale = torch.ones(2, requires_grad=True)
        >>> unregistered_tensors(Sequential({"encoder": nn.Sequential(layer)}))
        [('encoder.0.scale', 'encoder')]
    """
    return list(submodel_names(model, [path for path, _ in find_unregistered(model)]).items())


def grouped_grad_norms(
    named: Iterable[tuple[str, nn.Parameter]], owners: Mapping[str, str], root: str = "(model)"
) -> dict[str, float]:
    """L2 norm of the current gradient of each sub-model (``owners``: parameter -> sub-model).

    Parameters without a gradient are left out; one host read for all groups. A sparse
    gradient counts by its stored values. The model itself (owner ``""``) is named ``root``.

    Example:
        >>> import torch
        >>> w = nn.Parameter(torch.zeros(2))
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> grouped_grad_norms([("head.w", w)], {"head.w": "head"})
        {'head': 5.0}
    """
    named = list(named)
    if any(p.grad is not None and is_sharded(p.grad) for _, p in named):  # FSDP2: whole norms, not this rank's shard
        return whole_grad_norms(named, owners, root)
    groups: dict[str, list[Tensor]] = {}
    for name, p in named:
        if p.grad is not None:
            groups.setdefault(owners[name] or root, []).append(stored(p.grad.detach()))
    if not groups:
        return {}
    norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g))) for g in groups.values()]
    return dict(zip(groups, torch.stack(norms).tolist()))


def submodel_grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each sub-model's current gradient, named as the gradient guard names them.

    Parameters without a gradient are left out; a sub-model none of whose parameters has one
    is missing from the result. One host read.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from composites import Sequential
        >>> model = Sequential({"encoder": nn.Linear(3, 4), "head": nn.Linear(4, 2)})
        >>> model(torch.randn(5, 3)).sum().backward()
        >>> sorted(submodel_grad_norms(model))
        ['encoder', 'head']
    """
    named = list(model.named_parameters())
    return grouped_grad_norms(named, submodel_names(model, [n for n, _ in named]))


def require_module(model: Any) -> nn.Module:
    """``model`` itself when it is an ``nn.Module``; else a ``TypeError`` naming what it is.

    >>> require_module(nn.Linear)
    Traceback (most recent call last):
    ...
    TypeError: GradientGuard(model=...) needs the nn.Module being trained, got type (the class itself: pass Linear(...), an instance)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"GradientGuard(model=...) needs the nn.Module being trained, got {type(model).__name__}"
            + (f" (the class itself: pass {model.__name__}(...), an instance)" if isinstance(model, type) else "")
        )
    return model
