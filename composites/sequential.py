"""Sequential composite: stage i's output is stage i+1's input."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._util import describe, named_modules_from, register_children


class StageError(RuntimeError):
    """A stage of a :class:`Sequential` raised; the message names the stage and what it received.

    ``stage`` is the dotted path of the failing stage (a nested Sequential extends it),
    ``received`` the shapes it was given, ``cause`` the original exception.
    """

    def __init__(self, stage: str, module: str, received: str, cause: BaseException):
        self.stage, self.module, self.received, self.cause = stage, module, received, cause
        super().__init__(
            f"stage '{stage}' ({module}) failed on input {received}: {type(cause).__name__}: {cause}"
        )

    def __reduce__(self):  # pickle (multiprocessing, DDP spawn) rebuilds it from all four fields
        return type(self), (self.stage, self.module, self.received, self.cause)

    @classmethod
    def wrap(cls, name: str, stage: nn.Module, received: str, error: Exception) -> StageError:
        if isinstance(error, StageError):  # nested Sequential: keep the innermost stage, longer path
            return cls(f"{name}.{error.stage}", error.module, error.received, error.cause)
        return cls(name, type(stage).__name__, received, error)


def call_stage(stage: nn.Module, value: Any) -> Any:
    """Feed one stage: a tuple becomes positional arguments, a mapping keyword arguments."""
    if isinstance(value, tuple):
        return stage(*value)
    if isinstance(value, Mapping):
        return stage(**value)
    return stage(value)


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
        first, *rest = self.stage_names
        if torch.compiler.is_compiling():  # no try/except in traced code: one graph, no breaks
            value = self._modules[first](*args, **kwargs)
            for name in rest:
                value = call_stage(self._modules[name], value)
            return value
        try:
            value = self._modules[first](*args, **kwargs)
        except Exception as error:
            raise StageError.wrap(first, self._modules[first], describe(args + tuple(kwargs.values())), error) from error
        for name in rest:
            try:
                value = call_stage(self._modules[name], value)
            except Exception as error:
                raise StageError.wrap(name, self._modules[name], describe(value), error) from error
        return value
