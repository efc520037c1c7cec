"""Sequential composite: stage i's output is stage i+1's input."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from .children import named_modules_from, register_children, run_child


def as_call(value: Any) -> tuple[tuple, dict]:
    """How one stage's output feeds the next: a tuple positionally, a mapping by keyword."""
    if isinstance(value, tuple):
        return value, {}
    if isinstance(value, Mapping):
        return (), dict(value)
    return (value,), {}


class Sequential(nn.Module):
    """Chain sub-models: the output of stage i is the input of stage i+1.

    Stages are registered under the user's names, so parameters are ``encoder.weight``,
    ``head.bias``, ... A stage that returns a tuple feeds the next one positionally, a mapping
    feeds it by keyword. When a stage raises (a shape mismatch, say), a :class:`StageError`
    (a ``RuntimeError``) names the stage and the shapes it received.

    Args:
        stages: mapping name -> ``nn.Module``, or a sequence (named ``"0"``, ``"1"``, ...).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = Sequential({"encoder": nn.Linear(4, 8), "head": nn.Linear(8, 2)})
        >>> model(torch.zeros(3, 4)).shape
        torch.Size([3, 2])
        >>> [name for name, _ in model.named_parameters()]
        ['encoder.weight', 'encoder.bias', 'head.weight', 'head.bias']
    """

    def __init__(self, stages: Mapping[str, nn.Module] | Sequence[nn.Module]):
        super().__init__()
        self.stage_names = register_children(
            self, named_modules_from(stages, "stage"), "stage", reserved=("stage_names",)
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        value = None
        for name in self.stage_names:
            value = run_child(name, self._modules[name], args, kwargs)
            args, kwargs = as_call(value)
        return value
