"""Composites as plain nn.Modules: nesting, torch containers, state_dict, dtype, repr, deepcopy, slicing, compile."""

import copy

import pytest
import torch
from torch import nn

from composites import Conditional, Parallel, Sequential
from tests.stand_ins import identity_linear, with_grad


def sequential():
    return Sequential({"encoder": nn.Linear(3, 4), "act": nn.ReLU(), "head": nn.Linear(4, 2)})


def parallel():
    return Parallel({"left": nn.Linear(3, 2), "right": nn.Linear(3, 2)}, combine="sum")


def conditional():
    return Conditional({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2), "c": nn.Linear(3, 2)}, router=nn.Linear(3, 3))


def nested():
    """Sequential[encoder, Parallel[Conditional[a, b, c], skip], head]."""
    moe = Conditional({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2), "c": nn.Linear(3, 2)}, router=identity_linear(3))
    mix = Parallel({"moe": moe, "skip": nn.Linear(3, 2)}, combine="concat")
    return Sequential({"encoder": identity_linear(3), "mix": mix, "head": nn.Linear(4, 1)})


BUILDERS = {"sequential": sequential, "parallel": parallel, "conditional": conditional, "nested": nested}
NAMES = {
    "sequential": ["encoder", "act", "head"],
    "parallel": ["left", "right", "combine='sum'"],
    "conditional": ["a", "b", "c", "router", "router=module, top_k=1"],
    "nested": ["encoder", "mix", "moe", "router", "skip", "head", "combine='concat'"],
}
X = torch.tensor([[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 0.0, 0.0]])  # the nested gate routes a, b, a


def build(kind, seed=0):
    torch.manual_seed(seed)
    return BUILDERS[kind]()


def test_nested_parameter_names_and_exact_gradient_set():
    model = nested()
    names = [n for n, _ in model.named_parameters()]
    assert names == [
        "encoder.weight", "encoder.bias",
        "mix.moe.a.weight", "mix.moe.a.bias", "mix.moe.b.weight", "mix.moe.b.bias",
        "mix.moe.c.weight", "mix.moe.c.bias", "mix.moe.router.weight", "mix.moe.router.bias",
        "mix.skip.weight", "mix.skip.bias", "head.weight", "head.bias",
    ]  # fmt: skip
    out = model(X)
    assert out.shape == (3, 1)
    out.sum().backward()
    assert model.mix.moe.active_branches == ("a", "b")
    assert with_grad(model) == set(names) - {"mix.moe.c.weight", "mix.moe.c.bias"}


def test_torch_containers_are_accepted_as_stages_and_branches():
    seq = Sequential(nn.ModuleList([nn.Linear(2, 3), nn.Linear(3, 1)]))
    assert [n for n, _ in seq.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    par = Parallel(nn.ModuleDict({"a": nn.Identity(), "b": nn.Identity()}))
    assert par.branch_names == ("a", "b") and par(torch.ones(1, 2)).shape == (1, 4)
    named = Conditional(nn.Sequential(nn.Identity(), nn.Identity()), router=lambda x: "1")
    assert named.branch_names == ("0", "1")


@pytest.mark.parametrize("kind", BUILDERS)
def test_state_dict_round_trip_restores_the_outputs(kind):
    model, fresh = build(kind, seed=0), build(kind, seed=1)
    assert not torch.equal(model(X), fresh(X))  # different weights, or the test proves nothing
    fresh.load_state_dict(model.state_dict())
    assert list(fresh.state_dict()) == list(model.state_dict())
    assert torch.equal(fresh(X), model(X))


@pytest.mark.parametrize("kind", BUILDERS)
def test_to_float64_converts_every_parameter_and_keeps_the_outputs(kind):
    model = build(kind)
    expected = model(X).double()
    model.to(torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    out = model(X.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", BUILDERS)
def test_repr_shows_names(kind):
    text = repr(build(kind))
    for name in NAMES[kind]:
        assert (f"({name}): " if "=" not in name else name) in text


@pytest.mark.parametrize("kind", BUILDERS)
def test_deepcopy_after_forward_is_independent(kind):
    model = build(kind)
    out = model(X)  # a score-routing Conditional now holds its last gate, part of the graph
    clone = copy.deepcopy(model)
    assert torch.equal(clone(X), out)
    with torch.no_grad():
        for p in clone.parameters():
            p.add_(1.0)
    assert torch.equal(model(X), out)
    assert not torch.equal(clone(X), out)


class Sliced(nn.Module):
    """Uses its parameter only through a slice and an index."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3, 3))

    def forward(self, x):  # (batch, 3) -> (batch, 2)
        return x @ self.weight[:, :2] + self.weight[0].sum()


WRAPS = {
    "sequential": lambda m: Sequential({"sliced": m, "out": nn.Identity()}),
    "parallel": lambda m: Parallel({"sliced": m, "other": nn.Linear(3, 2)}, combine="dict"),
    "conditional": lambda m: Conditional({"sliced": m, "other": nn.Linear(3, 2)}, router=None),
}


@pytest.mark.parametrize("wrap", WRAPS)
def test_slicing_and_indexing_a_parameter_keeps_its_gradient(wrap):
    inner = Sliced()
    model = WRAPS[wrap](inner)
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    out = model(x, route="sliced") if wrap == "conditional" else model(x)
    (out["sliced"] if wrap == "parallel" else out).sum().backward()
    # x @ W[:, :2] gives column sums of x (5, 7, 9) in columns 0-1; W[0].sum() adds batch * units
    # = 2 * 2 = 4 to every entry of row 0.
    expected = torch.tensor([[9.0, 9.0, 4.0], [7.0, 7.0, 0.0], [9.0, 9.0, 0.0]])
    assert torch.equal(inner.weight.grad, expected)
    assert with_grad(model) == {"sliced.weight"}


def test_sequential_and_parallel_compile_without_graph_breaks(seeded):
    x = torch.randn(5, 3)
    for model in (sequential(), Parallel({"left": nn.Linear(3, 2), "right": nn.Linear(3, 4)})):
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.slow
def test_compiled_sequential_and_parallel_match_eager(seeded):
    x = torch.randn(5, 3)
    for model in (sequential(), parallel()):
        torch.testing.assert_close(torch.compile(model)(x), model(x))
