"""The guard on a model sharded with FSDP2 (``fully_shard``): per-rank arrivals, local shards, whole norms."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..modules import is_under
from .diagnosis import diagnose
from .dtensors import FSDPModule, local, whole_grad_norms
from .non_finite_source import non_finite_problems
from .problems import Problem

if TYPE_CHECKING:
    from .step import StepRecord


class _Handle:
    """Removes one parameter's mark (and its hook on the unsharded tensor, if placed)."""

    def __init__(self, sharded: ShardedArrivals, index: int):
        self.sharded = sharded
        self.index = index

    def remove(self) -> None:
        self.sharded.marks.pop(self.index, None)
        handle = self.sharded.placed.pop(self.index, (None, None))[1]
        if handle is not None:
            handle.remove()


class ShardedArrivals:
    """Which parameters THIS rank reached in a backward, on a model sharded with FSDP2.

    ``fully_shard`` replaces each parameter with a sharded ``DTensor``: a tensor hook on it never
    fires, and its post-accumulate hook fires once per reduce-scatter, after the ranks' gradients
    are summed, and also for unused parameters under ``set_reduce_scatter_unused_params(True)``
    (zeros). Neither says "reached here". What does: during a unit's forward its modules hold
    the unsharded parameters, which autograd treats as leaves. A forward pre-hook on each unit
    (after FSDP's own, which all-gathers) puts the guard's tensor hook on each unsharded
    parameter the first time it sees that tensor (FSDP keeps the same tensor from step to step).
    It fires only when this rank's backward computes a gradient for it, once per backward, also
    under ``set_requires_gradient_sync(False)``; the guard's one MAX all-reduce then makes a
    parameter fine when any rank reached it.

    Args:
        model: the guarded model, already sharded (its units are ``FSDPModule`` instances).
        names: the guard's parameter names (``model.named_parameters()``).

    Example:
        >>> ShardedArrivals.of(nn.Linear(2, 2), ["weight", "bias"]) is None  # not sharded: the plain hooks serve
        True
    """

    def __init__(self, model: nn.Module, names: Sequence[str]):
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        unit_paths = {path: m for path, m in model.named_modules() if isinstance(m, FSDPModule)}
        slots: dict[int, list[tuple[nn.Module, str, int]]] = {id(m): [] for m in self.units}
        for i, name in enumerate(names):
            owner, _, leaf = name.rpartition(".")
            unit = max((p for p in unit_paths if is_under(owner, p)), key=len)
            slots[id(unit_paths[unit])].append((model.get_submodule(owner), leaf, i))
        self.marks: dict[int, Callable[[Tensor | None], None]] = {}
        self.placed: dict[int, tuple[Tensor, Any]] = {}  # index -> (unsharded tensor, its hook handle)
        self.handles = [
            unit.register_forward_pre_hook(self._pre_forward(slots[id(unit)])) for unit in self.units if slots[id(unit)]
        ]

    @classmethod
    def of(cls, model: nn.Module, names: Sequence[str]) -> ShardedArrivals | None:
        """The arrivals of ``model`` if FSDP2 sharded it, else ``None``."""
        if FSDPModule is None or not any(isinstance(m, FSDPModule) for m in model.modules()):
            return None
        return cls(model, names)

    def _pre_forward(self, slots: list[tuple[nn.Module, str, int]]) -> Callable[..., None]:
        def place(unit: nn.Module, args: tuple) -> None:
            for owner, leaf, i in slots:
                tensor = owner._parameters.get(leaf)
                placed = self.placed.get(i)
                if tensor is None or i not in self.marks or (placed is not None and placed[0] is tensor):
                    continue
                if placed is not None:
                    placed[1].remove()
                self.placed[i] = (tensor, tensor.register_hook(self.marks[i]))

        return place

    def hook(self, index: int, mark: Callable[[Tensor | None], None]) -> _Handle:
        """Call ``mark(grad)`` whenever this rank's backward computes a gradient for parameter ``index``."""
        self.marks[index] = mark
        return _Handle(self, index)

    def remove(self) -> None:
        """Remove the unit hooks (the guard removes the per-parameter ones through their handles)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def diagnose(self, step: StepRecord, missing: set[int], non_finite: bool, *rest: Any) -> list[Problem]:
        """The guard's diagnosis on a sharded model; every rank calls it together.

        Every unit is all-gathered first (the same collectives on every rank), so a replay of
        this rank's forward runs no collective of its own, and the diagnosis sees the unsharded
        parameters, the tensors that forward used. Non-finite gradients are read from this
        rank's shards (the guard merges every rank's problems).
        """
        for unit in self.units:
            unit.unshard()
        try:
            unsharded = [self.placed[i][0] if i in self.placed else p for i, p in enumerate(step.params)]
            problems = diagnose(replace(step, params=unsharded), missing, False, *rest)
            if non_finite:
                shards = [SimpleNamespace(grad=None if p.grad is None else local(p.grad)) for p in step.params]
                problems += non_finite_problems(replace(step, params=shards))
        finally:
            for unit in self.units:
                unit.reshard()
        return problems

    @staticmethod
    def grad_norms(names: Sequence[str], params: Sequence[nn.Parameter], owners: dict[str, str]) -> dict[str, float]:
        """:func:`whole_grad_norms` of the guard's parameters (a collective: every rank calls it)."""
        return whole_grad_norms(zip(names, params), owners)
