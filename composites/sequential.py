"""Sequential composite: stage i's output is stage i+1's input."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ._util import describe, named_modules_from, register_children


class StageError(RuntimeError):
    """A stage of a :class:`Sequential` (or a branch of a :class:`Parallel`) raised.

    The message names it and what it received. ``stage`` is the dotted path of the failing
    sub-model (each enclosing composite extends it), ``role`` says ``"stage"`` or ``"branch"``,
    ``received`` the shapes it was given, ``cause`` the original exception.
    """

    def __init__(self, stage: str, module: str, received: str, cause: BaseException, role: str = "stage"):
        self.stage, self.module, self.received, self.cause, self.role = stage, module, received, cause, role
        self.failing: nn.Module | None = None  # the sub-model that raised (not pickled)
        super().__init__(
            f"{role} '{stage}' ({module}) failed on input {received}: {type(cause).__name__}: {cause}"
        )

    def __reduce__(self):  # pickle (multiprocessing, DDP spawn) rebuilds it from all its fields
        return type(self), (self.stage, self.module, self.received, self.cause, self.role)

    @classmethod
    def wrap(cls, name: str, child: nn.Module, received: str, error: Exception, role: str = "stage") -> StageError:
        if isinstance(error, StageError):  # nested: keep the innermost failure, under its full path
            # found by identity, so plain modules in between (a user's block holding a
            # composite) and branches picked by a router appear in the path as well
            inner = next((path for path, m in child.named_modules() if m is error.failing and path), error.stage)
            wrapped = cls(f"{name}.{inner}", error.module, error.received, error.cause, error.role)
            wrapped.failing = error.failing
            return wrapped
        wrapped = cls(name, type(child).__name__, received, error, role)
        wrapped.failing = child
        return wrapped


def run_child(name: str, child: nn.Module, args: tuple, kwargs: dict, role: str = "stage") -> Any:
    """Call a composite's sub-model; when it raises, re-raise naming it and what it received."""
    if torch.compiler.is_compiling():  # no try/except in traced code: one graph, no breaks
        return child(*args, **kwargs)
    try:
        return child(*args, **kwargs)
    except Exception as error:
        received = describe(args[0]) if len(args) == 1 and not kwargs else describe(args + tuple(kwargs.values()))
        raise StageError.wrap(name, child, received, error, role) from error


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
