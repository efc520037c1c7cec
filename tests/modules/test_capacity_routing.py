"""Per-sample routing into fixed-capacity slots: no host read, one graph, overflow dropped."""

import pytest
import torch
from torch import nn

from composites import Conditional, GradientGuard
from tests.stand_ins import identity_linear, linear, record_inputs, seeded_batches, with_grad


def experts(n=3, capacity_factor=None, top_k=1):
    branches = {name: linear(n, 2, w=float(i + 1), b=float(i)) for i, name in enumerate("abcd"[:n])}
    return Conditional(branches, router=identity_linear(n, bias=False), top_k=top_k, capacity_factor=capacity_factor)


X = torch.tensor([[3.0, 2.0, 0.0], [0.0, 3.0, 2.0], [0.0, 0.0, 2.0], [2.0, 3.0, 0.0], [4.0, 0.0, 1.0]])


@pytest.mark.parametrize("top_k", [1, 2])
def test_with_room_for_every_pair_it_matches_the_host_sized_dispatch_with_gradients(top_k):
    sized, slotted = experts(top_k=top_k), experts(capacity_factor=3 / top_k, top_k=top_k)
    out_sized, out_slotted = sized(X), slotted(X)
    torch.testing.assert_close(out_slotted, out_sized)
    assert int(slotted.dropped) == 0
    out_sized.square().sum().backward()
    out_slotted.square().sum().backward()
    for name, p in sized.named_parameters():
        q = slotted.get_parameter(name)
        # a branch no sample chose still ran on zero padding with weight 0: a zero gradient
        torch.testing.assert_close(q.grad, p.grad if p.grad is not None else torch.zeros_like(p))
    assert slotted.active_branches == ("a", "b", "c")


def test_pairs_past_capacity_are_dropped_earliest_samples_first():
    model = experts(capacity_factor=0.6)  # ceil(0.6 * 5 / 3) = 1 row per branch
    out = model(X)  # routes a, b, c, b, a: samples 3 and 4 find their branch full
    assert int(model.dropped) == 2
    reference = experts()(X)
    torch.testing.assert_close(out[:3], reference[:3])
    assert torch.equal(out[3:], torch.zeros(2, 2))


def test_each_branch_runs_once_on_its_slots_padded_with_zeros():
    model = experts(capacity_factor=1.2)  # ceil(1.2 * 5 / 3) = 2 rows per branch
    seen = record_inputs(model)
    model(X)
    assert {name: len(calls) for name, calls in seen.items()} == {"a": 1, "b": 1, "c": 1}
    assert torch.equal(seen["a"][0], X[[0, 4]])
    assert torch.equal(seen["b"][0], X[[1, 3]])
    assert torch.equal(seen["c"][0], torch.stack([X[2], torch.zeros(3)]))


def test_whole_forward_traces_into_one_graph_with_no_host_read(dynamo_counters):
    # fullgraph=True raises at any graph break: a .tolist()/.item() or a data-sized tensor
    # would be one. The same graph serves every batch of the same size.
    model = Conditional({f"e{i}": nn.Linear(4, 4) for i in range(4)}, router=nn.Linear(4, 4), capacity_factor=1.25)

    def with_aux(x):  # the load-balancing loss too: no bincount, no host read
        return model(x), model.load_balancing_loss()

    compiled = torch.compile(with_aux, fullgraph=True, backend="eager")
    for x in seeded_batches(3, 16, 4):
        torch.testing.assert_close(compiled(x), with_aux(x))
    assert dynamo_counters["stats"]["unique_graphs"] == 1


def test_guard_passes_and_the_gate_learns():
    model = experts(capacity_factor=1.0)
    guard = GradientGuard(model)
    model(X).sum().backward()
    report = guard.check()
    assert report.inactive_names == []
    assert with_grad(model) == {n for n, _ in model.named_parameters()}
    assert model.router.weight.grad.abs().sum() > 0


def test_capacity_factor_is_validated_and_shown():
    with pytest.raises(
        ValueError, match=r"capacity_factor=0 must be a positive finite number \(3 never drops\), or None"
    ):
        experts(capacity_factor=0)
    assert "capacity_factor=1.25" in repr(experts(capacity_factor=1.25))


def test_image_inputs_and_an_empty_batch_match_the_host_sized_dispatch(seeded):
    convs = {name: nn.Conv2d(1, 2, 3, padding=1) for name in "ab"}
    gate = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    sized = Conditional(convs, router=gate)
    slotted = Conditional(convs, router=gate, capacity_factor=2.0)
    x = torch.randn(5, 1, 4, 4)
    torch.testing.assert_close(slotted(x), sized(x))
    assert slotted(torch.zeros(0, 1, 4, 4)).shape == (0, 2, 4, 4)
    assert int(slotted.dropped) == 0
    slotted(x, route="a")  # a batch routed by name drops nothing: no stale count from before
    assert slotted.dropped is None
