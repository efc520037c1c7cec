"""``torch.compiler.disable`` for code that runs at import: Dynamo loads on the first call, not with composites."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def compiler_disable(*, recursive: bool = True) -> Callable[[F], F]:
    """A decorator that does what ``@torch.compiler.disable(recursive=...)`` does, without importing Dynamo now.

    ``torch.compiler.disable`` imports ``torch._dynamo`` (about a second) to build its wrapper, so a
    module that applies it at import time makes ``import composites`` pay for Dynamo even when
    nothing is ever compiled. This is torch's own lazy form of it (``torch._disable_dynamo``, which
    torch applies to its own functions for the same reason): the wrapper lives in a file Dynamo
    never traces, so a compiled caller breaks its graph at the call, as at a disabled function,
    and its first call builds ``torch.compiler.disable(fn, recursive)`` and runs that. So under
    ``torch.compile`` the graphs, graph breaks and recompiles are the same, and with
    ``recursive=False`` the function's own frame is still skipped while what it calls (a branch
    the user compiled) still compiles. What differs is the reason Dynamo's graph-break log gives:
    a function in ``torch/_compile.py`` marked as skipped, not a ``torch.compiler.disable``'d one.
    Eagerly, the call costs one attribute lookup more.

    Example:
        >>> @compiler_disable(recursive=False)
        ... def count(x: torch.Tensor) -> list[int]:
        ...     return torch.bincount(x).tolist()  # data-dependent sizes: not for the trace
        >>> count(torch.tensor([0, 2, 2]))
        [1, 0, 2]
    """
    return torch._disable_dynamo(recursive=recursive)  # imports no Dynamo until the wrapped function runs
