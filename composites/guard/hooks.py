"""The hooks a GradientGuard puts on a model: they never carry the guard into a copy or a pickle."""

from __future__ import annotations

import weakref
from typing import Any

from torch import Tensor, nn


class Dropped:
    """What a copied or unpickled model holds in place of a guard's hook: it records nothing."""

    def __call__(self, *args: Any) -> None:
        return None


class Recorder:
    """The forward pre-hook. It holds the guard weakly, and copies and pickles as a no-op, so a
    model deep-copied (EMA, teacher) or saved whole never carries the guard or its recorded calls."""

    __slots__ = ("guard",)

    def __init__(self, guard: Any):
        self.guard = weakref.ref(guard)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        guard = self.guard()
        if guard is not None:
            guard._record_call(module, args, kwargs)

    def __deepcopy__(self, memo: dict) -> Dropped:
        return Dropped()

    def __reduce__(self) -> tuple:
        return Dropped, ()


class Arrived:
    """Per-parameter state; the tensor hook is its bound ``mark``. That runs once per parameter
    per backward: a bound method costs little more than a closure (``__call__`` costs about
    twice as much) and, unlike a closure, copies and pickles, as a no-op like :class:`Recorder`."""

    __slots__ = ("add", "index")

    def __init__(self, add: Any, index: int):
        self.add, self.index = add, index

    def mark(self, grad: Tensor | None) -> None:
        if grad is not None:
            self.add(self.index)

    def __deepcopy__(self, memo: dict) -> Arrived:
        return Arrived(Dropped(), 0)

    def __reduce__(self) -> tuple:
        return Arrived, (Dropped(), 0)
