"""Sequential(outputs=...): choose what of a stage's output goes to the next stage."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch
from torch import nn

from composites import GradientGuard, Sequential, StageError
from tests.stand_ins import linear, with_grad


class Several(nn.Module):
    """Returns a mapping, like a Hugging Face model: a sequence of states and a pooled vector."""

    def __init__(self):
        super().__init__()
        self.proj = linear(2, 2, w=1.0)

    def forward(self, x):
        h = self.proj(x)
        return {"last_hidden_state": torch.stack([h, 3 * h], dim=1), "pooler_output": 2 * h}


@dataclasses.dataclass
class Out:
    features: torch.Tensor
    extra: torch.Tensor


class AsDataclass(nn.Module):
    def forward(self, x):
        return Out(features=x + 1, extra=x * 0)


Pair = namedtuple("Pair", ["first", "second"])


class AsNamedTuple(nn.Module):
    def forward(self, x):
        return Pair(x, -x)


x = torch.tensor([[1.0, 2.0]])  # proj: every unit 1 + 2 + 0 = 3


def test_a_field_of_a_mapping_output_goes_on_as_the_one_argument():
    model = Sequential({"encoder": Several(), "head": nn.Identity()}, outputs={"encoder": "pooler_output"})
    assert torch.equal(model(x), torch.tensor([[6.0, 6.0]]))


def test_a_function_of_the_output_pools_it():
    model = Sequential(
        {"encoder": Several(), "head": nn.Identity()},
        outputs={"encoder": lambda out: out["last_hidden_state"].mean(dim=1)},
    )
    assert torch.equal(model(x), torch.tensor([[6.0, 6.0]]))  # mean of 3 and 9


def test_dataclass_fields_named_tuple_fields_and_tuple_indices():
    assert torch.equal(Sequential({"a": AsDataclass()}, outputs={"a": "features"})(x), x + 1)
    assert torch.equal(Sequential({"a": AsNamedTuple()}, outputs={"a": "second"})(x), -x)
    assert torch.equal(Sequential({"a": AsNamedTuple()}, outputs={"a": -1})(x), -x)


def test_the_last_stages_pick_is_the_composites_output():
    model = Sequential({"encoder": Several()}, outputs={"encoder": "pooler_output"})
    assert torch.equal(model(x), torch.tensor([[6.0, 6.0]]))


def test_gradients_reach_the_stage_through_the_picked_field():
    model = Sequential({"encoder": Several(), "head": linear(2, 1)}, outputs={"encoder": "pooler_output"})
    guard = GradientGuard(model)
    model(x).sum().backward()
    assert guard.check().ok
    assert with_grad(model) == {"encoder.proj.weight", "encoder.proj.bias", "head.weight", "head.bias"}


def test_an_unknown_field_lists_the_fields_there_are():
    model = Sequential({"encoder": Several(), "head": nn.Identity()}, outputs={"encoder": "pooled"})
    with pytest.raises(ValueError) as caught:
        model(x)
    assert str(caught.value).startswith(
        "Sequential outputs['encoder']='pooled': stage 'encoder' returned dict "
        "{last_hidden_state: Tensor[1, 2, 2], pooler_output: Tensor[1, 2]} with fields last_hidden_state, "
        "pooler_output; pick one of them"
    )
    with pytest.raises(ValueError, match=r"outputs\['a'\]=2: stage 'a' returned Pair"):
        Sequential({"a": AsNamedTuple()}, outputs={"a": 2})(x)


def test_bad_outputs_are_refused_when_built():
    with pytest.raises(
        ValueError,
        match="outputs names stage\\(s\\) 'encodr' that Sequential does not have; its stages are 'encoder', 'head'",
    ):
        Sequential({"encoder": Several(), "head": nn.Identity()}, outputs={"encodr": "pooler_output"})
    with pytest.raises(TypeError, match="a module with parameters belongs in a stage of its own"):
        Sequential({"encoder": Several()}, outputs={"encoder": nn.Linear(2, 2)})


def test_without_outputs_a_mapping_feeds_by_keyword_and_a_failure_says_how_to_pick():
    model = Sequential({"encoder": Several(), "head": nn.Linear(2, 2)})
    with pytest.raises(StageError) as caught:
        model(x)
    assert caught.value.stage == "head"
    assert (
        "stage 'encoder' returned a mapping, passed on as keyword arguments; to pass one field, "
        "use Sequential(..., outputs={'encoder': '<field name>'})" in str(caught.value)
    )


def test_compiles_to_one_graph():
    model = Sequential({"encoder": Several(), "head": linear(2, 1)}, outputs={"encoder": "pooler_output"})
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # a graph break would raise
    assert torch.equal(compiled(x), model(x))
