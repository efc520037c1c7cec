"""One text-table formatter and one grouped-norm computation behind every table and picture."""

import math

import torch
from torch import nn

import composites.guard
import composites.views
from composites import GradientGuard, Problem, Sequential
from composites.guard import format_table, grouped_grad_norms, text_table
from composites.views import format_flow, gradient_flow
from tests.stand_ins import linear


def test_every_table_is_the_one_formatter_aligned_without_trailing_spaces():
    assert composites.views.text_table is composites.guard.text_table
    assert text_table(("test metric", "value"), [("test/acc", "0.9833")]).splitlines() == [
        "test metric  value",
        "test/acc     0.9833",
    ]
    problems = format_table([Problem("head.weight", "head", "unused", "'head' never ran")]).splitlines()
    assert problems[:2] == ["parameter    sub-model  cause   where", "head.weight  head       unused  'head' never ran"]
    model = Sequential({"encoder": linear(3, 4), "head": linear(4, 2)})
    guard = GradientGuard(model)
    model(torch.ones(2, 3)).sum().backward()
    flow = format_flow(gradient_flow(guard, guard.check())).splitlines()
    assert [line.index("Linear") for line in flow[1:]] == [flow[0].index("type")] * 2
    assert all(line == line.rstrip() for line in flow)


def test_the_flow_tree_norms_are_the_guards_grouped_norms_sparse_gradients_included():
    embedding = nn.Embedding(5, 3, sparse=True)
    nn.init.constant_(embedding.weight, 0.1)
    model = Sequential({"embed": embedding, "head": linear(3, 1)})
    guard = GradientGuard(model)
    model(torch.tensor([1, 2, 1])).sum().backward()  # an uncoalesced sparse gradient: row 1 twice
    report = guard.check()
    nodes = {n.label: n for n in gradient_flow(guard, report).walk()}
    expected = grouped_grad_norms(
        model.named_parameters(), {"embed.weight": "embed", "head.weight": "head", "head.bias": "head"}
    )
    assert nodes["embed"].grad_norm == expected["embed"] == report.grad_norms()["embed"]
    assert abs(nodes["embed"].grad_norm - math.sqrt(3 * 0.2**2 + 3 * 0.1**2)) < 1e-6
    assert nodes["head"].grad_norm == expected["head"]
