"""The per-step NaN/Inf check of the gradients, with a GradScaler's overflow steps let through."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .dtensors import local
from .finite import any_non_finite


class FiniteCheck:
    """Whether this step's gradients hold NaN/Inf, and whether that is a GradScaler overflow step.

    While ``scaler`` is enabled, non-finite gradients with a finite loss are an overflow step
    the scaler skips (it lowers its scale), not a problem, unless that happens more than
    ``patience`` steps in a row. A non-finite loss is a real NaN: it neither counts toward the
    patience nor resets the count.

    Example:
        >>> w = nn.Parameter(torch.ones(2))
        >>> w.grad = torch.tensor([1.0, float("inf")])
        >>> FiniteCheck()([w], None)
        (True, False)
    """

    def __init__(self, scaler: Any = None, patience: int = 20):
        self.scaler = scaler
        self.patience = patience
        self.overflows = 0

    def __call__(self, params: Sequence[nn.Parameter], loss: Tensor | None) -> tuple[bool, bool]:
        """(a NaN/Inf gradient to report, an overflow step let through); one fused pass, one host read."""
        grads = [local(p.grad) for p in params if p.grad is not None]  # a sharded grad: this rank's shard
        if not grads or not any_non_finite(grads):
            self.overflows = 0
            return False, False
        if (
            self.scaler is not None
            and self.scaler.is_enabled()
            and (loss is None or bool(torch.isfinite(loss.detach()).all()))
        ):
            self.overflows += 1
            if self.overflows <= self.patience:
                return False, True
        return True, False
