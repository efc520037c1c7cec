"""Non-finite steps and checkpoints: skip a NaN/Inf step and count it, stop after K in a row, never save NaN weights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_warn
from torch import Tensor

from ...guard import GradientFlowError, Problem
from ...guard.dtensors import local

NON_FINITE_POLICIES = ("skip", "apply")


class NonFiniteStepsError(GradientFlowError):
    """Training stopped: this many optimizer steps in a row had NaN/Inf gradients (``problems``: the last one's)."""

    def __init__(self, problems: Sequence[Problem], in_a_row: int = 0, step: int = 0):
        self.in_a_row = in_a_row
        self.step = step
        super().__init__(problems)
        self.args = (
            f"{in_a_row} optimizer steps in a row had non-finite gradients (up to step {step}); each was skipped, "
            f"so the weights are still finite. Training stopped (non_finite_patience={in_a_row}): lower the "
            f"learning rate, check the data, or clip gradients. The last step's problems:\n{self.args[0]}",
        )

    def __reduce__(self):
        return type(self), (self.problems, self.in_a_row, self.step)


class NonFiniteCheckpointError(RuntimeError):
    """A checkpoint was about to hold NaN/Inf weights; it was not written (earlier checkpoints are untouched)."""


class NonFinitePolicy:
    """What an optimizer step whose gradients hold NaN/Inf does (guard mode ``warn``; ``raise`` stops first).

    ``"skip"`` (default): the step's gradients are dropped (set to ``None``), so every torch
    optimizer leaves the weights and its state as they were; the step is counted
    (``skipped``), and ``patience`` such steps in a row stop training with
    :class:`NonFiniteStepsError`. ``"apply"``: the step goes through (the weights may become
    NaN; checkpoints still refuse them).

    Example:
        >>> import torch
        >>> policy = NonFinitePolicy("skip", patience=2)
        >>> w = torch.nn.Parameter(torch.ones(2)); w.grad = torch.tensor([float("nan"), 1.0])
        >>> policy.after_check([Problem("w", "", "non_finite")], [w], step=0)
        True
        >>> w.grad is None, policy.skipped, policy.in_a_row
        (True, 1, 1)
    """

    def __init__(self, policy: str = "skip", patience: int | None = 5):
        if policy not in NON_FINITE_POLICIES:
            raise ValueError(f"non_finite='{policy}' is not one of {', '.join(NON_FINITE_POLICIES)}")
        if patience is not None and patience < 1:
            raise ValueError(f"non_finite_patience={patience} must be at least 1, or None (never stop)")
        self.policy = policy
        self.patience = patience
        self.skipped = 0  # steps skipped in this fit
        self.in_a_row = 0

    def after_check(self, problems: Sequence[Problem], params: Iterable[Tensor], step: int) -> bool:
        """Apply the policy to the step about to be taken; True when it was skipped."""
        non_finite = [p for p in problems if p.cause == "non_finite"]
        if not non_finite:
            self.in_a_row = 0
            return False
        if self.policy == "apply":
            return False
        for p in params:  # an optimizer leaves a parameter without a gradient alone
            p.grad = None
        self.skipped += 1
        self.in_a_row += 1
        if self.patience is not None and self.in_a_row >= self.patience:
            raise NonFiniteStepsError(non_finite, self.in_a_row, step)
        rank_zero_warn(
            f"step {step}: non-finite gradients, optimizer step skipped ({self.in_a_row} in a row, "
            f"{self.skipped} in this fit; training stops after {self.patience} in a row)"
        )
        return True


def non_finite_weights(state_dict: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state_dict`` holding NaN or Inf (this rank's shards).

    >>> non_finite_weights({"a": torch.ones(2), "b": torch.tensor([float("inf")]), "n": torch.tensor([1])})
    ['b']
    """
    bad = []
    for name, value in state_dict.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(torch.isfinite(local(value)).all()):
            bad.append(name)
    return bad


def refuse_non_finite_checkpoint(trainer: Any, checkpoint: Mapping[str, Any]) -> None:
    """Raise :class:`NonFiniteCheckpointError` before a checkpoint with NaN/Inf weights is written.

    Every rank takes part (one small collective under DDP/FSDP), so all raise together.
    """
    bad = non_finite_weights(checkpoint.get("state_dict", {}))
    strategy = getattr(trainer, "strategy", None)
    any_bad = bool(bad)
    if strategy is not None and getattr(trainer, "world_size", 1) > 1:
        any_bad = strategy.reduce_boolean_decision(any_bad, all=False)
    if any_bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "") or "(on another rank)"
        raise NonFiniteCheckpointError(
            f"not writing a checkpoint at step {getattr(trainer, 'global_step', '?')}: weights {shown} hold NaN/Inf "
            "(earlier checkpoints are untouched). With guard='warn' keep non_finite='skip' (the default) so a NaN "
            "step is not applied; guard='raise' stops at the first one"
        )
