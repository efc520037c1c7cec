"""The record of a step that the guard hands its diagnosis: what ran, how, and with what."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .forward_state import ForwardState


@dataclass(frozen=True)
class RecordedCall:
    """One forward call the guard recorded: the module, its arguments, and the state it started from.

    Example:
        >>> import torch
        >>> call = RecordedCall(nn.Identity(), (torch.ones(1),), {})
        >>> call.state is None
        True
    """

    module: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    state: ForwardState | None = None


def as_recorded(call: RecordedCall | tuple) -> RecordedCall:
    """A recorded call, or a ``(module, args, kwargs[, state])`` tuple (a hand-built record), as a :class:`RecordedCall`.

    Example:
        >>> as_recorded((nn.Identity(), (), {})).state is None
        True
    """
    return call if isinstance(call, RecordedCall) else RecordedCall(*call)


@dataclass(frozen=True)
class StepRecord:
    """Everything the diagnosis reads about the forwards and backward since the guard's last check.

    Attributes:
        model: the guarded model.
        names: the trainable-or-not parameter names, shared parameters once.
        params: the parameters, in the order of ``names``.
        submodels: parameter (or attribute) name -> the sub-model that owns it.
        calls: the calls to replay: the model's own since the last check, else the calls a
            training loop made to its direct children.
        no_grad_modules: ids of the model and its direct children called with gradients off.
        unregistered: ``(attribute path, sub-model)`` of tensors needing grad that are not
            ``nn.Parameter``s.
        check: the guard's count of checks, this one included (the step ``non_finite`` names).
        loss: the loss given to ``check()``, if any (``non_finite`` says whether it is finite).

    Example:
        >>> m = nn.Linear(2, 1)
        >>> StepRecord(m, ["weight", "bias"], list(m.parameters()), {"weight": "", "bias": ""}).calls
        []
    """

    model: nn.Module
    names: list[str]
    params: list[nn.Parameter]
    submodels: dict[str, str]
    calls: list[RecordedCall] = field(default_factory=list)
    no_grad_modules: frozenset[int] = frozenset()
    unregistered: list[tuple[str, str]] = field(default_factory=list)
    check: int = 0  # the guard's count of checks, this one included: the step non_finite names
    loss: Any = None  # the loss given to check() (a Tensor), else None
    # the forward runs collectives (expert parallelism's all-to-alls): a replay runs on every rank
    # together, also where there is nothing to explain, or the others would wait for it
    collective_forward: bool = False
