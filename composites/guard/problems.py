"""What the gradient guard reports: problems, the error that carries them, and the report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .table import text_table

HINTS: dict[str, str] = {
    "detached": "Keep the graph connected there: drop the .detach()/.data, and use torch ops instead of a .numpy()/.tolist()/.item() round trip or a torch.tensor() re-wrap.",
    "no_grad": "Run it with gradients on (remove the torch.no_grad()/inference_mode() around it), or freeze it with requires_grad_(False) if it is not meant to train.",
    "unused": "Call or read it in forward (or route to it), freeze or remove it if it is not meant to train, or declare it may_skip if only some steps use it.",
    "not_registered": "Wrap it in nn.Parameter (self.x = nn.Parameter(tensor)) so parameters(), the optimizer and state_dict see it.",
    "not_in_optimizer": "Build the optimizer from model.parameters() (or add a param group that holds it).",
    "non_differentiable_route": "Return soft scores from the router (Conditional weights each output by its gate probability); argmax/topk indices carry no gradient.",
    "non_finite": "Find the NaN/Inf source (log of 0, division, exploding loss): lower the learning rate, clip gradients, or add an eps.",
    "not_in_loss": "Use that output in the loss (e.g. add the auxiliary head's loss), drop or freeze (requires_grad_(False)) the part that makes it, or declare its parameters may_skip.",
    "starved": "Revive it: balance the router (a load-balancing loss, router noise, capacity), lower the drop rate, or narrow may_skip; raise starved_after (None: off) if this is expected.",
}
CAUSES: tuple[str, ...] = tuple(HINTS)


@dataclass(frozen=True)
class Problem:
    """One parameter that did not train properly in this backward.

    Attributes:
        parameter: qualified name as in ``model.named_parameters()`` (for ``not_registered``,
            the attribute's qualified path).
        module: qualified name of the sub-model that owns it (``""`` is the model itself).
        cause: one of :data:`CAUSES`.
        hint: one sentence on the fix.
        where: where the gradient was lost, when known (e.g. "inside 'encoder'.forward, after 'fc1'").

    Example:
        >>> problem = Problem("encoder.weight", "encoder", "no_grad")
        >>> problem.hint == HINTS["no_grad"]
        True
    """

    parameter: str
    module: str
    cause: str
    where: str = ""
    hint: str = ""

    def __post_init__(self) -> None:
        if self.cause not in HINTS:
            raise ValueError(f"unknown cause '{self.cause}', expected one of {CAUSES}")
        if not self.hint:
            object.__setattr__(self, "hint", HINTS[self.cause])


def format_table(problems: Sequence[Problem]) -> str:
    """The problems as a compact table (parameter, sub-model, cause, where), then one fix per cause.

    Example:
        >>> print(format_table([Problem("head.weight", "head", "unused", "'head' never ran in forward")]))
        parameter    sub-model  cause   where
        head.weight  head       unused  'head' never ran in forward
        fix unused: Call or read it in forward (or route to it), freeze or remove it if it is not meant to train, or declare it may_skip if only some steps use it.
    """
    rows = [(p.parameter, p.module or "(model)", p.cause, p.where or "-") for p in problems]
    hints = {p.cause: p.hint for p in problems}
    return "\n".join(
        [text_table(("parameter", "sub-model", "cause", "where"), rows)] + [f"fix {c}: {h}" for c, h in hints.items()]
    )


class GradientFlowError(RuntimeError):
    """Raised by :meth:`GradientGuard.check` when a trainable parameter did not train.

    ``problems`` lists every :class:`Problem`; ``str(err)`` is a readable table of them.

    Example:
        >>> err = GradientFlowError([Problem("fc.weight", "fc", "no_grad")])
        >>> err.problems[0].cause
        'no_grad'
    """

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(
            f"{count} parameter{'s' if count != 1 else ''} did not get a proper gradient in this backward:\n"
            + format_table(self.problems)
        )

    def __reduce__(self):  # pickle and copy rebuild it from its problems (the default passes the message)
        return type(self), (self.problems,)


@dataclass
class GuardReport:
    """What one :meth:`GradientGuard.check` found.

    ``checked`` counts the trainable parameters checked, ``frozen`` those with
    ``requires_grad=False``, ``inactive`` those in Conditional branches routed out in this
    forward (``frozen_names`` / ``inactive_names`` name them). ``overflow`` is True when a
    GradScaler overflow step was let through. :meth:`grad_norms` gives per-sub-model gradient
    norms (one device sync: call it when logging, not every step).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from composites import GradientGuard
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> _ = model[0].requires_grad_(False)
        >>> guard = GradientGuard(model)
        >>> model(torch.ones(1, 2)).sum().backward()
        >>> report = guard.check()
        >>> report.ok, report.checked, report.frozen_names, sorted(report.grad_norms())
        (True, 2, ['0.bias', '0.weight'], ['1'])
    """

    checked: int
    frozen: int
    inactive: int
    problems: list[Problem] = field(default_factory=list)
    overflow: bool = False
    _names: list[str] = field(default_factory=list, repr=False)
    _trainable: set[int] = field(default_factory=set, repr=False)
    _inactive: set[int] = field(default_factory=set, repr=False)
    _norms: Callable[[], dict[str, float]] | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def frozen_names(self) -> list[str]:
        return sorted(n for i, n in enumerate(self._names) if i not in self._trainable)

    @property
    def inactive_names(self) -> list[str]:
        return sorted(self._names[i] for i in self._inactive)

    def grad_norms(self) -> dict[str, float]:
        """L2 norm of the gradient of each sub-model (qualified name -> norm)."""
        return self._norms() if self._norms is not None else {}
