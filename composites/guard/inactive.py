"""Parameters that may go without a gradient in a step (routed-out branches, ``may_skip`` patterns), and their starvation.

A routed-out branch or a may-skip parameter that gets no gradient check after check has starved.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

from ..modules import Conditional, is_under, join_name

# Why 200 consecutive checks (each check is one optimizer step, whatever the accumulation):
# - 8 experts, top-1, a learned gate: an expert with its fair share misses a step with
#   probability (7/8)**batch, at worst 7/8 (one routing decision per step). 200 misses in a
#   row: (7/8)**200 = 2.6e-12, so a run of a million steps with 8 experts has about 2e-6
#   false alarms (at 100 it would be about 1). A dead expert is named after 200 steps.
# - LayerDrop 0.1 (Wav2Vec2, BART, Whisper drop each layer on their own): 0.1**200 = 1e-200;
#   even a drop rate of 0.5 gives 6e-61. A drop rate of 1.0 is named at check 200.
# - A branch routed by name for a training phase (pretrain then finetune) idles for the whole
#   phase, thousands of steps: no count tells that from a dead branch. The caller named the
#   branch on purpose, so steps in which a Conditional routed by name do not count.
STARVED_AFTER = 200


class Starvation:
    """Counts, per parameter, the consecutive checks in which an excusable parameter got no gradient.

    Args:
        after: checks without a gradient that make it ``starved`` (``None``: never); it is
            reported at that check and again every ``after`` checks while it lasts.

    Example:
        >>> s = Starvation(after=2)
        >>> s.update(countable={0, 1}, reached={1}), s.update(countable={0, 1}, reached={1})
        ({}, {0: 2})
        >>> s.update(countable={0}, reached={0}), s.counts
        ({}, {})
    """

    def __init__(self, after: int | None = STARVED_AFTER):
        if after is not None and (isinstance(after, bool) or not isinstance(after, int) or after < 1):
            raise ValueError(
                f"starved_after={after!r} must be a positive number of checks, or None to never report starvation"
            )
        self.after = after
        self.counts: dict[int, int] = {}

    def update(self, countable: set[int], reached: set[int]) -> dict[int, int]:
        """Count one check; return ``{index: checks without a gradient}`` for those to report now.

        ``countable``: the parameters that may go without a gradient in this check (branches of
        a score-routed Conditional, may-skip parameters); ``reached``: those that got one.
        """
        if self.after is None:
            return {}
        counts, due = self.counts, {}
        for i in [i for i in counts if i in reached]:  # a gradient in any step ends the count
            del counts[i]
        for i in countable - reached:  # a set difference: per-step Python work only for those without a gradient
            counts[i] = counts.get(i, 0) + 1
            if counts[i] % self.after == 0:
                due[i] = counts[i]
        return due

    def forget(self, keep: set[int]) -> None:
        """Drop the counts of parameters no longer countable (frozen, or the parameters were refreshed)."""
        self.counts = {i: n for i, n in self.counts.items() if i in keep}


class InactiveParameters:
    """Which parameters a step may leave without a gradient, and which of them have starved.

    Args:
        may_skip: glob patterns over parameter names (``"*.experts.*"``); each must match one.
        starved_after: see :class:`Starvation` (``None``: off).

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
