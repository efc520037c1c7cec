"""The hooks a GradientGuard puts on a model: they never carry the guard into a copy or a pickle,
and they work on a model that is (or is later) ``torch.compile``-d."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from ..modules.compiler_disable import compiler_disable


class Dropped:
    """What a copied or unpickled model holds in place of a guard's hook: it records nothing."""

    def __call__(self, *args: Any) -> None:
        return None


def uncompiled(model: nn.Module) -> nn.Module:
    """The eager module behind ``torch.compile(model)`` (the model itself when it is not compiled).

    The guard names parameters as the eager model does (``fc.weight``, not ``_orig_mod.fc.weight``)
    and replays the eager module: the same graph, traced op by op.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> uncompiled(torch.compile(layer)) is layer, uncompiled(layer) is layer
        (True, True)
    """
    return model._orig_mod if isinstance(model, torch._dynamo.eval_frame.OptimizedModule) else model


class EagerRandom:
    """While a guarded model runs compiled, Inductor draws its random numbers as eager code does.

    By default Inductor makes the random numbers of a compiled graph (dropout, ``torch.rand``
    LayerDrop, MoE router noise) from seeds it takes from the default generator: other numbers
    than eager code draws from the same state, and the generator moves on by another amount, so
    a replay of the eager module from the recorded state takes another path (a layer LayerDrop
    skipped runs in the replay, and its parameters are blamed on the loss). Between the start and
    the return of a call of the guarded model, Inductor's ``fallback_random`` is on: the graphs
    compiled in that call draw through PyTorch's generators, op by op as eager code does, so the
    replay reproduces the forward that happened. Compiles outside the model's calls are not
    touched, and a ``torch.compile(..., options={"fallback_random": False})`` of the user's wins.
    What it costs: random ops in the model's graphs run as their own (eager) kernels instead of
    fused into Inductor's; graphs compiled before the guard existed keep Inductor's generator.

    Example:
        >>> import torch._inductor.config as inductor
        >>> scope = EagerRandom()
        >>> scope.enter()
        >>> inductor.fallback_random
        True
        >>> scope.exit()
        >>> inductor.fallback_random
        False
    """

    __slots__ = ("saved",)

    def __init__(self) -> None:
        self.saved: list[bool] = []  # the values to put back, innermost call last

    def enter(self) -> None:
        from torch._inductor import config  # imported only once Dynamo compiles: torch.compile has loaded it

        self.saved.append(config.fallback_random)
        config.fallback_random = True

    def exit(self) -> None:
        if self.saved:
            from torch._inductor import config

            config.fallback_random = self.saved.pop()


@compiler_disable()
def _record(recorder: Recorder, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """The model's own call recorded while Dynamo traces it: run eagerly, so Dynamo neither traces
    the recording nor fails on it (one graph break, before the model's graph). The graphs compiled
    from here until the call returns draw random numbers as eager code does (:class:`EagerRandom`)."""
    if recorder.random is not None:
        recorder.random.enter()
    guard = recorder.guard()
    if guard is not None:
        guard.record_call(module, args, kwargs)


@compiler_disable()
def _returned(random: EagerRandom) -> None:
    """The compiled model's call returned: run eagerly (one graph break, after the model's graph)."""
    random.exit()


class Recorder:
    """The forward pre-hook. It holds the guard weakly, and copies and pickles as a no-op, so a
    model deep-copied (EMA, teacher) or saved whole never carries the guard or its recorded calls.

    ``root`` marks the hook on the model itself: its calls are what a failing check replays, so
    it records even when Dynamo meets it (a model compiled before or after the guard was built):
    outside a compiled region as usual it costs nothing, inside one (a compiled ``nn.Sequential``
    or training step) one graph break before the model's graph; ``random`` (the root's) makes the
    graphs compiled in that call draw random numbers as eager code does. The hooks on the model's
    children record nothing while Dynamo traces them (no graph break): a failing check replays the
    model's recorded call eagerly and sees them there.
    """

    __slots__ = ("guard", "random", "root")

    def __init__(self, guard: Any, root: bool = False, random: EagerRandom | None = None):
        self.guard = weakref.ref(guard)
        self.root = root
        self.random = random

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.compiler.is_compiling():
            if self.root:
                _record(self, module, args, kwargs)
            return
        guard = self.guard()
        if guard is not None:
            guard.record_call(module, args, kwargs)

    def __deepcopy__(self, memo: dict) -> Dropped:
        return Dropped()

    def __reduce__(self) -> tuple:
        return Dropped, ()


class Returned:
    """The forward hook on the model itself (``always_call``): a compiled call that returns, or
    raises, puts Inductor's random numbers back as they were before it (:class:`EagerRandom`).
    Copies and pickles as a no-op, like :class:`Recorder`."""

    __slots__ = ("random",)

    def __init__(self, random: EagerRandom):
        self.random = random

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if torch.compiler.is_compiling() or self.random.saved:  # saved: Dynamo ran this hook eagerly
            _returned(self.random)

    def __deepcopy__(self, memo: dict) -> Dropped:
        return Dropped()

    def __reduce__(self) -> tuple:
        return Dropped, ()


def record_calls(guard: Any, model: nn.Module) -> list[Any]:
    """Put the guard's recorders on ``model`` (compiled or not) and its direct children; returns the handles.

    Example:
        >>> class Guard:
        ...     calls = []
        ...     def record_call(self, module, args, kwargs):
        ...         self.calls.append(type(module).__name__)
        >>> model, guard = nn.Sequential(nn.Linear(2, 2)), Guard()
        >>> handles = record_calls(guard, model)
        >>> _ = model(torch.zeros(1, 2))
        >>> guard.calls
        ['Sequential', 'Linear']
    """
    eager, random = uncompiled(model), EagerRandom()
    handles = [
        eager.register_forward_pre_hook(Recorder(guard, True, random), with_kwargs=True),
        eager.register_forward_hook(Returned(random), with_kwargs=True, always_call=True),
    ]
    recorder = Recorder(guard)
    handles += [m.register_forward_pre_hook(recorder, with_kwargs=True) for m in eager.children()]
    return handles


class Arrived:
    """Per-parameter state; the tensor hook is its bound ``mark``. That runs once per parameter
    per backward: a bound method costs little more than a closure (``__call__`` costs about
    twice as much) and, unlike a closure, copies and pickles, as a no-op like :class:`Recorder`."""

    __slots__ = ("add", "index")

    def __init__(self, add: Any, index: int):
        self.add = add
        self.index = index

    def mark(self, grad: Tensor | None) -> None:
        if grad is not None:
            self.add(self.index)

    def __deepcopy__(self, memo: dict) -> Arrived:
        return Arrived(Dropped(), 0)

    def __reduce__(self) -> tuple:
        return Arrived, (Dropped(), 0)
