"""Failures name the real path of the sub-model that raised; torch's own containers are accepted."""

import pytest
import torch
from torch import nn

from composites import Conditional, Parallel, Sequential, StageError
from composites.modules.routing import load_balancing_loss


def failing_path(model, x):
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


def test_torch_containers_are_accepted_as_stages_and_branches():
    seq = Sequential(nn.ModuleList([nn.Linear(2, 3), nn.Linear(3, 1)]))
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    par = Parallel(nn.ModuleDict({"a": nn.Identity(), "b": nn.Identity()}))
    assert par.branch_names == ("a", "b") and par(torch.ones(1, 2)).shape == (1, 4)
    named = Conditional(nn.Sequential(nn.Identity(), nn.Identity()), router=lambda x: "1")
    assert named.branch_names == ("0", "1")


def test_per_sample_routing_of_a_non_tensor_input_is_a_clear_error():
    model = Conditional({"a": nn.Identity(), "b": nn.Identity()}, router=lambda x: torch.zeros(2, 2))
    with pytest.raises(
        TypeError, match=r"per-sample routing needs x to be a batched tensor \(batch, \.\.\.\), got dict"
    ):
        model({"x": torch.ones(2, 2)})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 1.0}, r"top_k=1.0 must be between 1 and the number of branches \(2\)"),
        ({"top_k": True}, r"top_k=True must be between"),
        ({"capacity_factor": float("inf")}, r"capacity_factor=inf must be a positive finite number \(2 never drops\)"),
        ({"capacity_factor": float("nan")}, r"capacity_factor=nan must be a positive finite number"),
    ],
)
def test_bad_top_k_and_capacity_are_refused_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Conditional({"a": nn.Identity(), "b": nn.Identity()}, router=nn.Linear(2, 2), **kwargs)


def test_load_balancing_loss_of_an_empty_batch_is_zero_and_keeps_the_graph():
    probs = torch.zeros(0, 3, requires_grad=True)
    loss = load_balancing_loss(probs, torch.zeros(0, 1, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad
