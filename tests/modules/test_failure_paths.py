"""A sub-model that fails is named by its real path in the model (one the user can look up), whoever picked it."""

import pytest
import torch
from torch import nn

from composites import Conditional, Sequential, StageError


def failing_path(model, x):
    """The StageError of ``model(x)``, whose path must be one of ``model.named_modules()``."""
    with pytest.raises(StageError) as info:
        model(x)
    assert info.value.stage in dict(model.named_modules())  # a path the user can look up
    return info.value


def test_a_branch_chosen_by_the_router_is_in_the_path():
    model = Sequential(
        {
            "moe": Conditional(
                {"small": Sequential({"proj": nn.Linear(5, 2)}), "big": nn.Identity()}, router=lambda x: "small"
            ),
            "head": nn.Identity(),
        }
    )
    error = failing_path(model, torch.ones(2, 3))
    assert (error.stage, error.module, error.received) == ("moe.small.proj", "Linear", "Tensor[2, 3]")


def test_a_plain_module_holding_a_composite_is_in_the_path():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Sequential({"proj": nn.Linear(5, 2)})

        def forward(self, x):
            return self.body(x)

    assert (
        failing_path(Sequential({"block": Block(), "head": nn.Identity()}), torch.ones(2, 3)).stage == "block.body.proj"
    )


@pytest.mark.parametrize("capacity_factor", [None, 2.0])
def test_a_failing_branch_under_per_sample_routing_is_named_with_its_rows(capacity_factor):
    gate = nn.Linear(3, 2)
    with torch.no_grad():
        gate.weight.zero_()
        gate.bias.copy_(torch.tensor([0.0, 5.0]))  # every sample to 'bad'
    model = Sequential(
        {
            "moe": Conditional(
                {"ok": nn.Linear(3, 2), "bad": nn.Linear(4, 2)}, router=gate, capacity_factor=capacity_factor
            )
        }
    )
    error = failing_path(model, torch.ones(3, 3))
    assert (error.stage, error.role) == ("moe.bad", "branch")
    assert error.received == "Tensor[3, 3]"  # its 3 routed rows, or its 3 slots at capacity 2.0
