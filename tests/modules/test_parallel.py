"""Parallel: combine modes, per-branch inputs, shape errors, the combine() override point."""

import pytest
import torch
from torch import nn

from composites import Parallel, Sequential, StageError
from tests.stand_ins import linear, with_grad

X = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
A = torch.tensor([[3.0, 3.0], [1.0, 1.0]])  # linear(2, 2, w=1)(X)
B = torch.tensor([[7.0, 7.0], [3.0, 3.0]])  # linear(2, 2, w=2, b=1)(X)


def two_branches(combine):
    return Parallel({"a": linear(2, 2, w=1.0), "b": linear(2, 2, w=2.0, b=1.0)}, combine=combine)


class Pick(nn.Module):
    """Returns one entry of the mapping it is given."""

    def __init__(self, key):
        super().__init__()
        self.key = key

    def forward(self, inputs):
        return inputs[self.key]


class WeightedSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor([1.0, 0.5]))

    def forward(self, outputs):
        return self.alpha[0] * outputs["a"] + self.alpha[1] * outputs["b"]


@pytest.mark.parametrize(
    "combine, expected",
    [
        ("concat", torch.cat([A, B], dim=-1)),
        ("sum", A + B),
        ("mean", (A + B) / 2),
        ("stack", torch.tensor([[[3.0, 3.0], [7.0, 7.0]], [[1.0, 1.0], [3.0, 3.0]]])),
    ],
)
def test_tensor_combine_modes_exact(combine, expected):
    assert torch.equal(two_branches(combine)(X), expected)


def test_concat_uses_last_dim_and_stack_a_new_dim_1():
    model = Parallel({"a": nn.Identity(), "b": nn.Linear(3, 4)}, combine="concat")
    assert model(torch.zeros(2, 5, 3)).shape == (2, 5, 7)
    model = Parallel({"a": nn.Identity(), "b": nn.Identity(), "c": nn.Identity()}, combine="stack")
    assert model(torch.zeros(2, 5, 3)).shape == (2, 3, 5, 3)


def test_dict_combine_returns_branch_outputs_in_order():
    out = two_branches("dict")(X)
    assert list(out) == ["a", "b"]
    assert torch.equal(out["a"], A) and torch.equal(out["b"], B)


def test_module_combiner_is_registered_and_trains():
    model = two_branches(WeightedSum())
    assert [n for n, _ in model.named_parameters()] == ["a.weight", "a.bias", "b.weight", "b.bias", "combiner.alpha"]
    out = model(X)
    assert torch.equal(out, A + 0.5 * B)
    out.sum().backward()
    assert with_grad(model) == {"a.weight", "a.bias", "b.weight", "b.bias", "combiner.alpha"}
    assert torch.equal(model.combiner.alpha.grad, torch.tensor([A.sum().item(), B.sum().item()]))


def test_a_callable_combiner_combines_and_shows_in_the_repr():
    def difference(outputs):
        return outputs["a"] - outputs["b"]

    model = two_branches(difference)
    assert torch.equal(model(X), A - B)
    assert "combine=difference" in repr(model)


def test_per_branch_inputs_from_one_mapping_or_keywords():
    model = Parallel({"a": nn.Identity(), "b": linear(2, 2, w=1.0)}, combine="concat")
    xa, xb = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[1.0, 1.0]])
    expected = torch.tensor([[1.0, 2.0, 3.0, 2.0, 2.0]])
    assert torch.equal(model({"a": xa, "b": xb}), expected)
    assert torch.equal(model(a=xa, b=xb), expected)
    assert torch.equal(model({"b": xb, "a": xa, "unused": torch.zeros(9)}), expected)  # extra keys are fine


def test_mapping_without_every_branch_name_goes_whole_to_each_branch():
    seen = []
    model = Parallel({"a": Pick("x"), "b": Pick("y")}, combine="concat")
    for branch in (model.a, model.b):
        branch.register_forward_hook(lambda mod, args, out: seen.append(sorted(args[0])))
    x, y = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    assert torch.equal(model({"x": x, "y": y}), torch.tensor([[1.0, 2.0]]))
    assert seen == [["x", "y"], ["x", "y"]]
    # "a" is a branch name but "b" is missing: still the whole mapping for each branch
    model = Parallel({"a": Pick("a"), "b": Pick("y")}, combine="concat")
    assert torch.equal(model({"a": x, "y": y}), torch.tensor([[1.0, 2.0]]))


@pytest.mark.parametrize(
    "combine, branches, message",
    [
        ("sum", {"a": nn.Linear(2, 3), "b": nn.Linear(2, 2)}, r"the same shape .*'a': \(4, 3\), 'b': \(4, 2\)"),
        ("stack", {"a": nn.Linear(2, 3), "b": nn.Linear(2, 2)}, r"the same shape .*'a': \(4, 3\), 'b': \(4, 2\)"),
        ("concat", {"a": nn.Identity(), "b": Pick(slice(0, 1))}, r"all but the last .*'a': \(4, 2\), 'b': \(1, 2\)"),
    ],
)
def test_mismatched_branch_shapes_name_the_branches(combine, branches, message):
    with pytest.raises(ValueError, match=message):
        Parallel(branches, combine=combine)(torch.zeros(4, 2))


def test_non_tensor_outputs_need_dict_or_callable():
    model = Parallel({"a": nn.Identity(), "b": Pick(0)}, combine="sum")
    with pytest.raises(TypeError, match=r"'a': \(Tensor\[2\], Tensor\[2\]\).*combine='dict'"):
        model((torch.zeros(2), torch.zeros(2)))


def test_unknown_or_wrong_type_combine_is_refused():
    with pytest.raises(ValueError, match="unknown combine 'max': choose one of concat, sum, mean, stack, dict"):
        Parallel({"a": nn.Identity()}, combine="max")
    with pytest.raises(TypeError, match="combine must be a string, an nn.Module or a callable, got int"):
        Parallel({"a": nn.Identity()}, combine=3)


@pytest.mark.parametrize("name", ["mode", "combiner", "forward", "x.y"])
def test_bad_branch_names_are_refused(name):
    with pytest.raises(ValueError, match=f"branch name '{name}' cannot be used"):
        Parallel({name: nn.Linear(2, 2), "b": nn.Identity()}, combine=WeightedSum())


def test_subclass_overrides_combine():
    class Maximum(Parallel):
        def combine(self, outputs):
            return torch.maximum(outputs["a"], outputs["b"] - 5)

    assert torch.equal(Maximum({"a": linear(2, 2, w=1.0), "b": linear(2, 2, w=2.0, b=1.0)})(X), torch.maximum(A, B - 5))


def test_only_branches_that_reach_the_loss_get_gradients():
    model = two_branches("dict")
    model(X)["a"].sum().backward()
    assert with_grad(model) == {"a.weight", "a.bias"}
    assert torch.equal(model.a.weight.grad, X.sum(0).expand(2, 2))


def test_a_failing_branch_is_named_with_its_path_and_input():
    model = Sequential({"fuse": Parallel({"image": nn.Linear(4, 2), "flat": nn.Linear(5, 2)})})
    with pytest.raises(
        StageError, match=r"^branch 'fuse\.flat' \(Linear\) failed on input Tensor\[3, 4\]: RuntimeError"
    ) as caught:
        model(torch.zeros(3, 4))
    assert (caught.value.stage, caught.value.role) == ("fuse.flat", "branch")
