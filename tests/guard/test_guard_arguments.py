"""GradientGuard's arguments checked where they enter: the model and the optimizer."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from composites import GradientGuard


def test_a_model_that_is_not_a_module_is_named():
    with pytest.raises(TypeError) as info:
        GradientGuard(nn.Linear)
    assert str(info.value) == (
        "GradientGuard(model=...) needs the nn.Module being trained, got type (the class itself: pass Linear(...), an instance)"
    )


def test_an_optimizer_that_is_not_built_is_named():
    with pytest.raises(TypeError) as info:
        GradientGuard(nn.Linear(2, 2), partial(torch.optim.Adam, lr=1e-3))
    assert str(info.value) == (
        "GradientGuard(optimizer=...) needs the built optimizer that holds the parameters (its param_groups), got partial: "
        "build it first, e.g. torch.optim.Adam(model.parameters())"
    )
