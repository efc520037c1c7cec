"""The diagnosis reads the autograd graph once: each node visited once, the same answers as a walk per call."""

import torch
from torch import nn

from composites import Parallel, Sequential
from composites.guard.reach import CallReach
from composites.guard.replay import replay
from tests.stand_ins import linear


def reachable(ends) -> set[int]:
    """The reference: ids of the leaf tensors reached from ``ends``, by a walk of its own (no memo shared)."""
    found: set[int] = set()
    seen: set[int] = set()
    stack = list(ends)
    while stack:
        node = stack.pop()
        if isinstance(node, torch.Tensor):
            found.add(id(node))
            continue
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad holds its leaf
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


class Attention(nn.Module):
    """MultiheadAttention reads out_proj.weight without calling out_proj; a shared layer used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.shared = linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attention(x, x, x)
        return self.shared(self.shared(h).detach() + h)


def test_every_call_reaches_the_same_parameters_as_a_walk_of_its_own():
    torch.manual_seed(0)
    model = Sequential(
        {
            "branches": Parallel({"a": linear(4, 4), "b": nn.Sequential(linear(4, 4), nn.ReLU())}, combine="sum"),
            "attend": Attention(),
            "head": linear(4, 2),
        }
    )
    trace = replay(model, [(model, (torch.randn(2, 3, 4),), {})])
    reach = CallReach(trace, {id(p) for p in model.parameters()})
    assert len(trace) == 11  # shared runs twice
    for call in trace:
        for side in ("inputs", "outputs"):
            assert reach(call, side) == reachable(getattr(call, side)), (call.path, side)
    for p in model.parameters():
        for side in ("inputs", "outputs"):
            assert reach.calls(id(p), side) == [c for c in trace if id(p) in reachable(getattr(c, side))]


def test_a_deep_chain_is_read_in_one_visit_per_graph_node():
    depth = 300
    model = nn.Sequential(*(linear(3, 3) for _ in range(depth)))
    trace = replay(model, [(model, (torch.ones(2, 3),), {})])
    reach = CallReach(trace, {id(p) for p in model.parameters()})
    # per layer: AddmmBackward, TBackward and two AccumulateGrad; a walk per call would visit ~depth**2 * 2
    assert reach.graph.visits == 4 * depth
    assert reach.calls(id(model[0].weight), "outputs") == trace  # the model and every layer carry the first weight
