"""The tensors in a nested value: a forward's arguments or outputs (tuples, lists, dicts, Hugging Face outputs)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor


def tensors_in(value: Any, max_depth: int = 4, depth: int = 0) -> Iterator[Tensor]:
    """Every tensor in ``value``, looking ``max_depth`` levels into lists, tuples, dicts and ``to_tuple()`` objects.

    Args:
        value: a tensor, or a (nested) container of them and of other values, which are passed over.
        max_depth: how many levels of containers to open; deeper ones are passed over.
        depth: the level ``value`` stands at (for the recursion).

    Example:
        >>> import torch
        >>> [t.tolist() for t in tensors_in({"a": torch.ones(1), "b": [torch.zeros(2), "text", ((torch.ones(1),),)]})]
        [[1.0], [0.0, 0.0], [1.0]]
        >>> len(list(tensors_in([[torch.ones(1)]], max_depth=1)))
        0
    """
    if isinstance(value, Tensor):
        yield value
    elif depth >= max_depth:
        return
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v, max_depth, depth + 1)
    elif isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v, max_depth, depth + 1)
    elif hasattr(value, "to_tuple"):  # a Hugging Face ModelOutput that is not a dict
        yield from tensors_in(value.to_tuple(), max_depth, depth + 1)
