"""Conditional: batch routing by name, per-sample top-k gate routing, gradients, errors."""

import math

import pytest
import torch
from torch import nn

from composites import Conditional
from composites.modules.routing import load_balancing_loss
from tests.stand_ins import identity_linear, linear, record_inputs, with_grad


def two_experts(router, top_k=1):
    return Conditional({"a": linear(2, 3, w=1.0), "b": linear(2, 3, w=-1.0, b=1.0)}, router=router, top_k=top_k)


def f_a(x):
    return x.sum(-1, keepdim=True).expand(-1, 3)


def f_b(x):
    return 1 - f_a(x)


# --- batch-level routing -----------------------------------------------------------------


def test_function_router_picks_a_branch_for_the_whole_batch():
    model = two_experts(lambda x: "b" if x.shape[0] > 1 else "a")
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(model(x), f_b(x)) and model.active_branches == ("b",)
    assert torch.equal(model(x[:1]), f_a(x[:1])) and model.active_branches == ("a",)
    with pytest.raises(RuntimeError, match="needs a forward with score routing"):
        model.load_balancing_loss()


def test_caller_names_the_branch_when_router_is_none():
    model = two_experts(None)
    x = torch.tensor([[1.0, 2.0]])
    assert torch.equal(model(x, route="b"), f_b(x)) and model.active_branches == ("b",)
    with pytest.raises(ValueError, match=r"no router: pass route=<branch> .*\['a', 'b'\]"):
        model(x)


def test_unknown_branch_name_lists_the_branches():
    with pytest.raises(KeyError, match=r"unknown branch 'c': this Conditional has \['a', 'b'\]"):
        two_experts(None)(torch.ones(1, 2), route="c")
    with pytest.raises(KeyError, match=r"unknown branch 'c'"):
        two_experts(lambda x: "c")(torch.ones(1, 2))


def test_batch_routing_grads_only_for_the_chosen_branch():
    model = two_experts(None)
    model(torch.ones(2, 2), route="a").sum().backward()
    assert with_grad(model) == {"a.weight", "a.bias"}


# --- per-sample score routing ------------------------------------------------------------


def test_gate_is_child_router_and_per_sample_output_is_exact():
    model = two_experts(identity_linear(2, bias=False))
    assert dict(model.named_children())["router"] is model.router
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [-1.0, 0.0]])  # -> a, b, a, b
    p = x.softmax(-1)
    expected = torch.stack([f_a(x)[0] * p[0, 0], f_b(x)[1] * p[1, 1], f_a(x)[2] * p[2, 0], f_b(x)[3] * p[3, 1]])
    torch.testing.assert_close(model(x), expected)
    assert model.active_branches == ("a", "b")


def test_each_branch_runs_once_on_its_own_samples():
    model = two_experts(identity_linear(2, bias=False))
    calls = record_inputs(model)
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0], [-1.0, 0.0]])
    model(x)
    assert [len(c) for c in calls.values()] == [1, 1]
    assert torch.equal(calls["a"][0], x[[0, 2]]) and torch.equal(calls["b"][0], x[[1, 3]])


def test_top_k_2_weights_both_branches_and_counts_calls():
    branches = {"a": linear(3, 2, w=1.0), "b": linear(3, 2, w=2.0), "c": linear(3, 2, w=0.0, b=5.0)}
    model = Conditional(branches, router=identity_linear(3, bias=False), top_k=2)
    calls = record_inputs(model)
    x = torch.tensor([[3.0, 2.0, 0.0], [0.0, 3.0, 2.0], [3.0, 0.0, 2.0], [2.0, 3.0, 0.0]])
    out = model(x)
    top = {"a": [0, 2, 3], "b": [0, 1, 3], "c": [1, 2]}
    assert {n: len(c) for n, c in calls.items()} == {"a": 1, "b": 1, "c": 1}
    assert all(torch.equal(calls[n][0], x[rows]) for n, rows in top.items())
    p, s = x.softmax(-1), x.sum(-1, keepdim=True)
    value = {"a": s, "b": 2 * s, "c": torch.full_like(s, 5.0)}
    expected = torch.zeros(4, 2)
    for i, name in enumerate("abc"):
        for row in top[name]:
            expected[row] += value[name][row] * p[row, i]
    torch.testing.assert_close(out, expected)
    assert model.active_branches == ("a", "b", "c")


def test_branch_without_samples_is_inactive_and_gets_no_grad():
    branches = {"a": nn.Linear(3, 2), "b": nn.Linear(3, 2), "c": nn.Linear(3, 2)}
    model = Conditional(branches, router=identity_linear(3, bias=False))
    calls = record_inputs(model)
    x = torch.tensor([[3.0, 2.0, 0.0], [0.0, 3.0, 2.0], [3.0, 0.0, 2.0]])  # -> a, b, a
    model(x).sum().backward()
    assert model.active_branches == ("a", "b")
    assert calls["c"] == []
    assert with_grad(model) == {"router.weight", "a.weight", "a.bias", "b.weight", "b.bias"}


def test_gate_gradient_is_exact():
    model = two_experts(identity_linear(2, bias=False))
    x = torch.tensor([[1.0, 0.0]])  # -> a; out = s * p_a with s = 1, p_a = sigmoid(1)
    model(x).sum().backward()
    # d(3 * sigmoid(x0 - x1))/dW, scores = W x: only column 0 of x is non-zero
    g = 3 * math.exp(-1) / (1 + math.exp(-1)) ** 2
    torch.testing.assert_close(model.router.weight.grad, torch.tensor([[g, 0.0], [-g, 0.0]]))


def test_load_balancing_loss_exact():
    model = two_experts(identity_linear(2, bias=False))
    model(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # balanced: half the samples each, mean prob 0.5
    torch.testing.assert_close(model.load_balancing_loss(), torch.tensor(1.0))
    model(torch.tensor([[2.0, 0.0], [1.0, 0.0]]))  # collapsed on "a": 2 * mean p_a
    sigmoid = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    aux = model.load_balancing_loss()
    torch.testing.assert_close(aux, torch.tensor(sigmoid(2.0) + sigmoid(1.0)))
    aux.backward()
    assert with_grad(model) == {"router.weight"}


def test_load_balancing_loss_of_an_empty_batch_is_zero_and_keeps_the_graph():
    probs = torch.zeros(0, 3, requires_grad=True)
    loss = load_balancing_loss(probs, torch.zeros(0, 1, dtype=torch.long))
    assert loss.item() == 0.0 and loss.requires_grad


def test_subclass_route_returning_a_name():
    class ByMagnitude(Conditional):
        def route(self, x):
            return "b" if x.abs().sum() > 10 else "a"

    model = ByMagnitude({"a": linear(2, 3, w=1.0), "b": linear(2, 3, w=-1.0, b=1.0)}, router=None)
    small, big = torch.ones(1, 2), torch.full((1, 2), 6.0)
    assert torch.equal(model(small), f_a(small)) and torch.equal(model(big), f_b(big))


def test_subclass_route_returning_scores():
    class BySign(Conditional):
        def route(self, x):
            return torch.stack([x[:, 0], -x[:, 0]], dim=1)

    model = BySign({"a": linear(2, 3, w=1.0), "b": linear(2, 3, w=-1.0, b=1.0)}, router=None)
    x = torch.tensor([[-1.0, 1.0], [-2.0, 5.0]])  # both negative -> "b"
    p_b = torch.sigmoid(-2 * x[:, :1])
    torch.testing.assert_close(model(x), f_b(x) * p_b)
    assert model.active_branches == ("b",)


@pytest.mark.parametrize(
    "scores, got",
    [(torch.zeros(4, 3), r"\(4, 3\)"), (torch.zeros(1, 2), r"\(1, 2\)"), (torch.zeros(4), r"\(4,\)"), (3, "int")],
)
def test_wrong_router_output_is_a_clear_error(scores, got):
    model = two_experts(lambda x: scores)
    with pytest.raises(
        ValueError, match=rf"branch name or scores of shape \(4, 2\) for branches \['a', 'b'\]; got {got}"
    ):
        model(torch.zeros(4, 2))


def test_per_sample_routing_of_a_non_tensor_input_is_a_clear_error():
    model = Conditional({"a": nn.Identity(), "b": nn.Identity()}, router=lambda x: torch.zeros(2, 2))
    with pytest.raises(
        TypeError, match=r"per-sample routing needs x to be a batched tensor \(batch, \.\.\.\), got dict"
    ):
        model({"x": torch.ones(2, 2)})


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match=r"top_k=3 must be between 1 and the number of branches \(2\)"):
        two_experts(identity_linear(2, bias=False), top_k=3)
    with pytest.raises(TypeError, match="router must be callable"):
        two_experts("a")
    for name in ("router", "top_k", "forward"):
        with pytest.raises(ValueError, match=f"branch name '{name}' cannot be used"):
            Conditional({name: nn.Identity(), "b": nn.Identity()}, router=lambda x: "b")


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


def test_empty_batch_with_a_gate_gives_an_empty_output_and_runs_nothing():
    model = Conditional({"a": nn.Linear(4, 3), "b": nn.Linear(4, 3)}, router=nn.Linear(4, 2))
    out = model(torch.zeros(0, 4))
    assert out.shape == (0, 3)
    assert model.active_branches == ()
