"""Deterministic stand-ins shared by the tests."""

from __future__ import annotations

from torch import nn


def linear(n_in: int, n_out: int, w: float = 0.1, b: float = 0.0) -> nn.Linear:
    """A Linear with constant weight ``w`` and bias ``b``: exact outputs, no dead unit by accident."""
    layer = nn.Linear(n_in, n_out)
    nn.init.constant_(layer.weight, w)
    nn.init.constant_(layer.bias, b)
    return layer


def with_grad(model: nn.Module) -> set[str]:
    """Names of the parameters that hold a gradient."""
    return {n for n, p in model.named_parameters() if p.grad is not None}
