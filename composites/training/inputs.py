"""What CompositeModule is given, checked where a mistake would otherwise surface deep in torch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


def check_loss_and_balancing(loss: Any, load_balancing: Any) -> None:
    """``loss`` must be a loss object or function (not a class), ``load_balancing`` a weight >= 0.

    >>> check_loss_and_balancing(torch.nn.CrossEntropyLoss, 0.0)
    Traceback (most recent call last):
    ...
    TypeError: CompositeModule(loss=...) got the class CrossEntropyLoss; pass an instance: CrossEntropyLoss()
    """
    if isinstance(loss, type):
        raise TypeError(f"CompositeModule(loss=...) got the class {loss.__name__}; pass an instance: {loss.__name__}()")
    if isinstance(load_balancing, bool) or not isinstance(load_balancing, (int, float)) or not load_balancing >= 0:
        raise ValueError(
            f"CompositeModule(load_balancing={load_balancing!r}) must be a number >= 0: it weighs the gates' "
            "load-balancing loss (0 turns it off; a negative weight would push the routing to collapse)"
        )


def check_optimizer_factory(optimizer: Any) -> None:
    """``optimizer`` must be a partial taking the parameter groups, not an optimizer already built.

    >>> check_optimizer_factory(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    Traceback (most recent call last):
    ...
    TypeError: CompositeModule(optimizer=...) got an SGD instance; it needs a partial that takes the parameter groups: functools.partial(torch.optim.SGD, lr=...) (Hydra: _partial_: true)
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        name = type(optimizer).__name__
        raise TypeError(
            f"CompositeModule(optimizer=...) got an {name} instance; it needs a partial that takes the parameter "
            f"groups: functools.partial(torch.optim.{name}, lr=...) (Hydra: _partial_: true)"
        )
    if not callable(optimizer):
        raise TypeError(
            f"CompositeModule(optimizer=...) got a {type(optimizer).__name__}; it needs a partial that takes the "
            "parameter groups, e.g. functools.partial(torch.optim.Adam, lr=1e-3) (Hydra: _partial_: true)"
        )


def check_trainable(groups: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    """The parameter groups, unless they hold no parameter at all (every parameter frozen).

    >>> check_trainable([{"name": "default", "params": []}])
    Traceback (most recent call last):
    ...
    ValueError: every parameter of the model is frozen (requires_grad=False): nothing to train. Unfreeze a sub-model (e.g. model.head.requires_grad_(True)) before training
    """
    if not any(len(group["params"]) for group in groups):
        raise ValueError(
            "every parameter of the model is frozen (requires_grad=False): nothing to train. Unfreeze a sub-model "
            "(e.g. model.head.requires_grad_(True)) before training"
        )
    return groups


def split_batch(batch: Any, describe: Callable[[Any], str] = lambda b: type(b).__name__) -> tuple[Any, Any]:
    """``(input, target)`` from a batch; a clear error for anything else (a dict, a 3-tuple).

    >>> split_batch({"image": 1, "label": 2})
    Traceback (most recent call last):
    ...
    TypeError: CompositeModule expects each batch as (input, target), got a dict with keys image, label: make the dataset return (input, target), or override training_step/validation_step
    """
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    got = f"a dict with keys {', '.join(map(str, batch))}" if isinstance(batch, Mapping) else f"a {describe(batch)}"
    if isinstance(batch, (tuple, list)):
        got = f"a {type(batch).__name__} of {len(batch)}"
    raise TypeError(
        f"CompositeModule expects each batch as (input, target), got {got}: make the dataset return "
        "(input, target), or override training_step/validation_step"
    )
