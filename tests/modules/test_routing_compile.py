"""Per-sample routing under torch.compile: one graph for the router, no recompile per batch."""

from __future__ import annotations

import torch
from torch import nn

from composites import Conditional
from tests.stand_ins import seeded_batches


def test_per_sample_routing_compiles_once_and_matches_eager(seeded, dynamo_counters):
    # The chunk sizes are data: traced, they broke the graph at bincount/.tolist() and the
    # rest recompiled for almost every batch (6 graphs over 4 batches, ~1 s each). The
    # dispatch now runs outside the trace: the router's graph is compiled once.
    model = Conditional({f"e{i}": nn.Linear(4, 4) for i in range(4)}, router=nn.Linear(4, 4))
    compiled = torch.compile(model, backend="eager")  # Dynamo's behaviour without codegen time
    for x in seeded_batches(4, 16, 4):
        out = compiled(x)
        torch.testing.assert_close(out, model(x))
        model.zero_grad()
        out.sum().backward()
        assert model.router.weight.grad is not None  # the gate still learns through the weights
    assert dynamo_counters["stats"]["unique_graphs"] == 1
