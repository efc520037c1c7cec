"""Routing the guard does not own (``may_skip``) and starvation (``starved_after``): exact sets and causes."""

import pytest
import torch
from torch import nn

from composites import Conditional, GradientFlowError, GradientGuard
from composites.guard import STARVED_AFTER
from tests.stand_ins import linear

X = torch.ones(4, 3)


class OwnRouterMoE(nn.Module):
    """Experts chosen by the model's own top-1 router, as Switch Transformers and NLLB-MoE do."""

    def __init__(self, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(3, experts)
        self.experts = nn.ModuleList(linear(3, 3, w=0.1 * (i + 1)) for i in range(experts))
        with torch.no_grad():
            self.router.weight.zero_()
            self.router.bias.copy_(torch.arange(experts, dtype=torch.float))  # every token picks the last expert

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        top = probs.argmax(-1)
        out = torch.zeros_like(x)
        for i, expert in enumerate(self.experts):
            rows = top == i
            if rows.any():
                out[rows] = expert(x[rows]) * probs[rows, i : i + 1]
        return out


class AlwaysDropped(nn.Module):
    """LayerDrop at a rate of 1.0: the first layer never runs."""

    def __init__(self, drop: float = 1.0) -> None:
        super().__init__()
        self.drop = drop
        self.layers = nn.ModuleList([linear(3, 3), linear(3, 3)])

    def forward(self, x):
        for layer in self.layers[:1]:
            if torch.rand(()) >= self.drop:
                x = layer(x)
        return self.layers[1](x)


def step(model: nn.Module, guard: GradientGuard):
    model.zero_grad()
    model(X).sum().backward()
    return guard.check(raise_error=False)


def test_experts_an_own_router_skipped_are_inactive_with_may_skip_and_unused_without():
    model = OwnRouterMoE()
    skipped = {f"experts.{i}.{p}" for i in range(3) for p in ("weight", "bias")}
    without = step(model, GradientGuard(model))
    assert {(p.parameter, p.cause) for p in without.problems} == {(n, "unused") for n in skipped}
    report = step(model, GradientGuard(model, may_skip=["experts.*"]))
    assert report.ok and set(report.inactive_names) == skipped and report.inactive == 6


def test_may_skip_takes_one_pattern_as_a_string_and_leaves_other_parameters_checked():
    model = AlwaysDropped()
    report = step(model, GradientGuard(model, may_skip="layers.0.*"))
    assert report.ok and report.inactive_names == ["layers.0.bias", "layers.0.weight"]
    model = OwnRouterMoE()
    report = step(model, GradientGuard(model, may_skip=["experts.0.*"]))
    assert {p.parameter for p in report.problems} == {f"experts.{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}


def test_a_may_skip_pattern_that_matches_nothing_is_refused_with_the_fix():
    with pytest.raises(
        ValueError, match=r"may_skip pattern 'expert\.\*' matches no parameter name .*'\*\.experts\.\*'"
    ):
        GradientGuard(OwnRouterMoE(), may_skip=["expert.*"])
    with pytest.raises(TypeError, match="may_skip entries must be glob patterns"):
        GradientGuard(OwnRouterMoE(), may_skip=[3])


def test_a_may_skip_layer_that_never_gets_a_gradient_is_starved_after_starved_after_checks():
    model = AlwaysDropped()
    guard = GradientGuard(model, may_skip=["layers.0.*"], starved_after=3)
    assert step(model, guard).ok and step(model, guard).ok
    report = step(model, guard)
    where = "no gradient in the last 3 checks in a row"
    assert {(p.parameter, p.module, p.cause, p.where) for p in report.problems} == {
        ("layers.0.weight", "layers.0", "starved", where),
        ("layers.0.bias", "layers.0", "starved", where),
    }
    with pytest.raises(GradientFlowError, match="fix starved: Revive it"):
        for _ in range(3):  # said again every starved_after checks, with the count
            model(X).sum().backward()
            guard.check()
    model.drop = 0.0  # the layer runs again: the count starts over
    assert all(step(model, guard).ok for _ in range(2))


def test_a_dead_expert_of_a_learned_gate_is_starved():
    gate = linear(3, 2)
    with torch.no_grad():
        gate.bias.copy_(torch.tensor([5.0, -5.0]))  # branch 'b' never wins
    model = Conditional({"a": linear(3, 2), "b": linear(3, 2)}, router=gate)
    guard = GradientGuard(model, starved_after=2)
    first = step(model, guard)
    assert first.ok and first.inactive_names == ["b.bias", "b.weight"]
    assert {(p.parameter, p.cause) for p in step(model, guard).problems} == {
        ("b.weight", "starved"),
        ("b.bias", "starved"),
    }


def test_a_branch_routed_by_name_for_a_training_phase_never_starves():
    model = Conditional({"pretrain": linear(3, 2), "finetune": linear(3, 2)}, router=lambda x: "pretrain")
    guard = GradientGuard(model, starved_after=2)
    reports = [step(model, guard) for _ in range(5)]
    assert all(r.ok and r.inactive_names == ["finetune.bias", "finetune.weight"] for r in reports)


def test_starvation_is_off_with_none_and_its_bad_values_are_refused():
    model = AlwaysDropped()
    guard = GradientGuard(model, may_skip=["layers.0.*"], starved_after=None)
    assert all(step(model, guard).ok for _ in range(4))
    for bad in (0, -1, True, 2.5, "10"):
        with pytest.raises(ValueError, match=r"starved_after=.* must be a positive number of checks, or None"):
            GradientGuard(model, starved_after=bad)
    assert STARVED_AFTER == 200
