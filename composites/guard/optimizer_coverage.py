"""Which trainable parameters an optimizer does not hold (the ``not_in_optimizer`` cause)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class OptimizerCoverage:
    """The trainable parameters missing from an optimizer; recomputed only when its groups change.

    Example:
        >>> from torch import nn
        >>> a, b = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
        >>> OptimizerCoverage(torch.optim.SGD([a], lr=0.1)).missing([a, b])
        [1]
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None = None):
        if optimizer is not None and not hasattr(optimizer, "param_groups"):
            raise TypeError(
                f"GradientGuard(optimizer=...) needs the built optimizer that holds the parameters (its param_groups), "
                f"got {type(optimizer).__name__}: build it first, e.g. torch.optim.Adam(model.parameters())"
            )
        self.optimizer = optimizer
        self._key: tuple[int, int] | None = None
        self._missing: list[int] = []

    def missing(self, params: Sequence[nn.Parameter]) -> list[int]:
        """Indices of the parameters that require grad and are in no param group (none without an optimizer)."""
        if self.optimizer is None:
            return []
        groups = self.optimizer.param_groups
        key = (len(groups), sum(len(g["params"]) for g in groups))
        if key != self._key:  # the groups changed (or the parameters were refreshed: forget())
            held = {id(p) for g in groups for p in g["params"]}
            self._missing = [i for i, p in enumerate(params) if id(p) not in held]
            self._key = key
        return [i for i in self._missing if params[i].requires_grad]

    def forget(self) -> None:
        """Recompute at the next call (the parameters were replaced)."""
        self._key = None
