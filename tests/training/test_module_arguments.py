"""CompositeModule's and GradientGuardCallback's arguments checked where they enter."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from composites import CompositeModule, GradientGuardCallback, Sequential


def module(**kwargs) -> CompositeModule:
    options = {"loss": nn.CrossEntropyLoss(), **kwargs}
    return CompositeModule(
        Sequential({"head": nn.Linear(4, 3)}), optimizer=partial(torch.optim.Adam, lr=1e-3), **options
    )


def test_a_loss_class_instead_of_a_loss_is_named():
    with pytest.raises(TypeError) as info:
        module(loss=nn.CrossEntropyLoss)
    assert (
        str(info.value)
        == "CompositeModule(loss=...) got the class CrossEntropyLoss; pass an instance: CrossEntropyLoss()"
    )


@pytest.mark.parametrize("weight", [-0.1, "0.1", True])
def test_a_load_balancing_weight_that_is_not_a_number_at_least_zero_is_refused(weight):
    with pytest.raises(ValueError, match=rf"^CompositeModule\(load_balancing={weight!r}\) must be a number >= 0"):
        module(load_balancing=weight)


def test_one_may_skip_string_is_one_pattern_not_its_letters():
    # as letters, '*' alone would have let every parameter go without a gradient
    assert GradientGuardCallback(may_skip="experts.*").may_skip == ["experts.*"]
