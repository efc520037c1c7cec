"""Sequential: stage naming, hand-off between stages, error messages, gradients."""

import pickle

import pytest
import torch
from torch import nn

from composites import Sequential, StageError
from tests.stand_ins import linear, with_grad


class Pair(nn.Module):
    """Returns a tuple (x, 2x)."""

    def forward(self, x):
        return x, 2 * x


class Named(nn.Module):
    """Returns a mapping whose key order is the reverse of the next stage's signature."""

    def forward(self, x):
        return {"b": 2 * x, "a": x}


class TakesAB(nn.Module):
    """Order-sensitive: 10 * a + b."""

    def forward(self, a, b):
        return 10 * a + b


def test_mapping_stages_keep_user_names():
    model = Sequential({"encoder": nn.Linear(4, 8), "head": nn.Linear(8, 2)})
    assert model.stage_names == ("encoder", "head")
    assert [n for n, _ in model.named_children()] == ["encoder", "head"]
    assert [n for n, _ in model.named_parameters()] == ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]


def test_sequence_stages_are_named_by_position():
    model = Sequential([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)])
    assert model.stage_names == ("0", "1", "2")
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_output_is_exact_through_two_stages():
    model = Sequential({"encoder": linear(2, 3, w=1.0, b=0.5), "head": linear(3, 1, w=2.0, b=-1.0)})
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    # encoder: 1+2+0.5 = 3.5 and 0-1+0.5 = -0.5 in every unit; head: 2 * 3 * h - 1
    assert torch.equal(model(x), torch.tensor([[20.0], [-4.0]]))


def test_tuple_output_feeds_next_stage_positionally():
    model = Sequential({"split": Pair(), "join": TakesAB()})
    assert torch.equal(model(torch.tensor([1.0])), torch.tensor([12.0]))  # 10 * 1 + 2, not 10 * 2 + 1


def test_mapping_output_feeds_next_stage_by_keyword():
    model = Sequential({"split": Named(), "join": TakesAB()})
    assert torch.equal(model(torch.tensor([1.0])), torch.tensor([12.0]))  # a=1, b=2 despite key order


def test_first_stage_gets_all_call_arguments():
    model = Sequential({"join": TakesAB(), "out": nn.Identity()})
    assert torch.equal(model(torch.tensor([1.0]), b=torch.tensor([3.0])), torch.tensor([13.0]))


def test_stage_error_names_stage_and_received_shape():
    model = Sequential({"encoder": nn.Linear(4, 8), "head": nn.Linear(5, 2)})
    with pytest.raises(StageError) as info:
        model(torch.zeros(3, 4))
    err = info.value
    assert isinstance(err, RuntimeError)
    assert err.stage == "head" and err.module == "Linear" and err.received == "Tensor[3, 8]"
    assert "stage 'head' (Linear) failed on input Tensor[3, 8]" in str(err)
    assert isinstance(err.cause, RuntimeError) and err.__cause__ is err.cause


def test_first_stage_error_describes_call_arguments():
    model = Sequential({"encoder": nn.Linear(4, 8), "head": nn.Linear(8, 2)})
    with pytest.raises(StageError, match=r"stage 'encoder' \(Linear\) failed on input Tensor\[3, 5\]: "):
        model(torch.zeros(3, 5))


def test_nested_sequential_error_names_dotted_path():
    inner = Sequential({"enc": nn.Linear(4, 8), "proj": nn.Linear(5, 2)})
    model = Sequential({"pre": nn.Identity(), "body": inner})
    with pytest.raises(StageError) as info:
        model(torch.zeros(3, 4))
    assert info.value.stage == "body.proj"
    assert "stage 'body.proj' (Linear) failed on input Tensor[3, 8]" in str(info.value)


def test_stage_error_survives_pickling():
    err = StageError("head", "Linear", "Tensor[3, 8]", ValueError("boom"))
    back = pickle.loads(pickle.dumps(err))
    assert (back.stage, back.module, back.received, str(back)) == (err.stage, err.module, err.received, str(err))


@pytest.mark.parametrize("name", ["forward", "double", "stage_names", "a.b", ""])
def test_bad_stage_names_are_refused(name):
    with pytest.raises(ValueError, match=f"stage name '{name}' cannot be used"):
        Sequential({name: nn.Identity(), "head": nn.Identity()})


def test_empty_and_non_module_stages_are_refused():
    with pytest.raises(ValueError, match="stage is empty"):
        Sequential({})
    with pytest.raises(TypeError, match="stage entry 'head' is a function, not an nn.Module"):
        Sequential({"encoder": nn.Identity(), "head": lambda x: x})
    with pytest.raises(TypeError, match="mapping name -> nn.Module or a sequence"):
        Sequential(nn.Linear(2, 2))


def test_exactly_trainable_parameters_get_gradients():
    frozen = nn.Linear(8, 8)
    frozen.requires_grad_(False)
    model = Sequential({"encoder": nn.Linear(4, 8), "frozen": frozen, "head": nn.Linear(8, 2)})
    model(torch.randn(3, 4)).sum().backward()
    assert with_grad(model) == {"encoder.weight", "encoder.bias", "head.weight", "head.bias"}


def test_gradient_values_through_stages_are_exact():
    model = Sequential({"encoder": linear(2, 1, w=3.0), "head": linear(1, 1, w=2.0)})
    model(torch.tensor([[1.0, 4.0]])).sum().backward()
    # d(2 * (3 * (x1 + x2)))/d(encoder.weight) = 2 * x
    assert torch.equal(model.encoder.weight.grad, torch.tensor([[2.0, 8.0]]))
    assert torch.equal(model.head.weight.grad, torch.tensor([[15.0]]))  # encoder output 3 * 5
