"""Parameters that may go without a gradient in a step: routed-out branches and ``may_skip`` patterns."""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from ..modules import Conditional, is_under, join_name
from .starvation import STARVED_AFTER, Starvation


class InactiveParameters:
    """Which parameters a step may leave without a gradient, and which of them have starved.

    Args:
        may_skip: glob patterns over parameter names (``"*.experts.*"``); each must match one.
        starved_after: see :class:`~composites.guard.starvation.Starvation` (``None``: off).

    Example:
        >>> from torch import nn
        >>> model = nn.ModuleDict({"experts": nn.ModuleList([nn.Linear(2, 2)]), "head": nn.Linear(2, 1)})
        >>> inactive = InactiveParameters(["experts.*"], starved_after=2)
        >>> inactive.refresh(model, [n for n, _ in model.named_parameters()])
        >>> inactive.drain()
        ({0, 1}, {0, 1})
    """

    def __init__(self, may_skip: Sequence[str] = (), starved_after: int | None = STARVED_AFTER):
        self.may_skip = (may_skip,) if isinstance(may_skip, str) else tuple(may_skip)
        for pattern in self.may_skip:
            if not isinstance(pattern, str):
                raise TypeError(f"may_skip entries must be glob patterns (str) over parameter names, got {pattern!r}")
        self.starvation = Starvation(starved_after)
        self.conditionals: list[tuple[Conditional, dict[str, set[int]]]] = []
        self.skippable: set[int] = set()

    def refresh(self, model: nn.Module, names: Sequence[str]) -> None:
        """Index the Conditional branches and may-skip matches by the guard's parameter order."""
        self.conditionals = [
            (c, {b: {i for i, n in enumerate(names) if is_under(n, join_name(path, b))} for b in c.branch_names})
            for path, c in model.named_modules()
            if isinstance(c, Conditional)
        ]
        self.skippable = set()
        for pattern in self.may_skip:
            hits = {i for i, n in enumerate(names) if fnmatchcase(n, pattern)}
            if not hits:
                example = names[-1] if names else "(no parameters)"
                raise ValueError(
                    f"may_skip pattern '{pattern}' matches no parameter name (names look like '{example}'); "
                    "fix the pattern, e.g. '*.experts.*' or 'encoder.layers.*'"
                )
            self.skippable |= hits
        self.starvation.forget(set())

    def drain(self) -> tuple[set[int], set[int]]:
        """(parameters excused in the step since the last call, those that count toward starvation).

        Excused: the branches each Conditional routed out in every forward since (a Conditional
        that never ran excuses nothing: its branches are 'unused'), and the may-skip parameters.
        Counted: the may-skip parameters and the branches of a Conditional routed by scores; a
        Conditional routed by name ran the branch its caller chose.
        """
        excused, countable = set(self.skippable), set(self.skippable)
        for conditional, branch_params in self.conditionals:
            ran = conditional.drain_ran()
            # under expert parallelism a rank's own experts may all have gone without samples while
            # the Conditional ran; had it not run at all, its gate (on every rank) says so
            if not ran and conditional.dispatcher is None:
                continue
            scored = conditional.last_gate is not None
            for branch, indices in branch_params.items():
                if branch not in ran:
                    excused |= indices
                if scored:
                    countable |= indices
        return excused, countable

    def starved(self, countable: set[int], reached: set[int], inactive: set[int]) -> dict[int, int]:
        """Count one check; ``{index: checks without a gradient}`` for inactive parameters that starved."""
        return {i: n for i, n in self.starvation.update(countable, reached).items() if i in inactive}
