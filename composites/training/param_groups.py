"""Optimizer parameter groups chosen by sub-model name: each trainable parameter exactly once."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from ..modules import is_under


def plain(value: Any) -> Any:
    """Deep-copy mappings and sequences into ``dict``/``list`` (e.g. configs from Hydra).

    Checkpoints are read with ``torch.load(weights_only=True)``, which only accepts plain
    containers, so hyperparameters must not keep config objects.

    >>> plain(({"lr": 1, "betas": (0.9, 0.99)},))
    [{'lr': 1, 'betas': [0.9, 0.99]}]
    """
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [plain(v) for v in value]
    return value


def build_param_groups(
    model: nn.Module,
    groups: Sequence[Mapping[str, Any]] | None = None,
    extra: Iterable[tuple[str, nn.Parameter]] = (),
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``model`` into optimizer parameter groups.

    Each spec ``{"prefix": "encoder", "lr": 1e-4, ...}`` takes the parameters whose qualified
    name (as in ``model.named_parameters()``) is the prefix or starts with ``prefix + "."``;
    the other keys are optimizer options for that group. A parameter goes to the FIRST spec
    that matches it; all remaining trainable parameters form the group ``"default"``, which
    takes the optimizer's own options. A parameter shared by two sub-models is matched under
    either sub-model's name and appears once,
    frozen parameters (``requires_grad=False``) not at all, and a spec whose parameters are
    all frozen is left out. Each group carries its ``"name"`` (the prefix, or ``"default"``).

    Args:
        model: the model whose parameters are grouped.
        groups: the specs, in priority order.
        extra: more ``(name, parameter)`` pairs to place the same way (e.g. a loss with weights).

    Raises:
        ValueError: a spec has no ``prefix``, or its prefix matches no parameter name; the
            message lists the model's top-level sub-models.

    Example:
        >>> from torch import nn
        >>> model = nn.ModuleDict({"encoder": nn.Linear(2, 2), "head": nn.Linear(2, 1)})
        >>> [(g["name"], len(g["params"])) for g in build_param_groups(model, [{"prefix": "head", "lr": 0.1}])]
        [('head', 2), ('default', 2)]
    """
    specs = [dict(g) for g in groups or ()]
    for spec in specs:
        if "prefix" not in spec:
            raise ValueError(
                f"param group {spec} has no 'prefix': give the sub-model name, e.g. {{'prefix': 'encoder', 'lr': 1e-4}}"
            )
    # Every name of every parameter: a shared parameter is matched by a prefix naming ANY of
    # its owners, yet placed once (named_parameters() alone would only show its first name).
    aliases: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in [*model.named_parameters(remove_duplicate=False), *extra]:
        aliases.setdefault(id(p), (p, []))[1].append(name)
    buckets: list[list[nn.Parameter]] = [[] for _ in specs]
    default: list[nn.Parameter] = []
    matched = [False] * len(specs)
    for p, names in aliases.values():
        hits = [i for i, spec in enumerate(specs) if any(is_under(n, str(spec["prefix"])) for n in names)]
        for i in hits:
            matched[i] = True
        if p.requires_grad:
            (buckets[hits[0]] if hits else default).append(p)  # the first matching spec wins
    for spec, found in zip(specs, matched):
        if not found:
            children = ", ".join(n for n, _ in model.named_children()) or "(none)"
            raise ValueError(
                f"param group prefix '{spec['prefix']}' matches no parameter; top-level sub-models are: {children}"
            )
    result = [
        {"params": params, "name": str(spec["prefix"]), **{k: v for k, v in spec.items() if k != "prefix"}}
        for spec, params in zip(specs, buckets)
        if params
    ]
    if default:
        result.append({"params": default, "name": "default"})
    return result
