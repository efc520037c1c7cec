"""NaN names its source: the first sub-model whose output went non-finite, else the first bad gradient in backward.

Each ``where`` also names the step (the guard's count of checks) and whether the loss is finite;
the healthy check never replays anything.
"""

import pytest
import torch
from torch import nn

from composites import GradientFlowError, GradientGuard, Sequential
from composites.guard import non_finite_source
from tests.stand_ins import linear

X = torch.ones(4, 3)


class Poison(nn.Module):
    """A middle stage that starts emitting NaN when switched on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = linear(3, 3)
        self.on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (float("nan") if self.on else 1.0)


class SqrtOfZero(nn.Module):
    """Finite forward, NaN backward: sqrt'(0) = inf, times the 0 it was scaled by (inf * 0 = NaN)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.fc(x) * 0.0)


def three_stages(mid: nn.Module) -> Sequential:
    return Sequential({"enc": linear(3, 3), "mid": mid, "head": linear(3, 2)})


def failing(guard: GradientGuard, loss: torch.Tensor, pass_loss: bool = True) -> dict[str, tuple[str, str]]:
    with pytest.raises(GradientFlowError) as caught:
        guard.check(loss=loss if pass_loss else None)
    return {p.parameter: (p.cause, p.where) for p in caught.value.problems}


def test_a_middle_stage_that_starts_emitting_nan_is_named_with_the_step_and_the_loss():
    model = three_stages(Poison())
    guard = GradientGuard(model)
    for _ in range(2):  # two clean steps
        loss = model(X).sum()
        loss.backward()
        assert guard.check(loss=loss).ok
    model.mid.on = True
    loss = model(X).sum()
    loss.backward()
    where = "step 3: first non-finite output in forward: 'mid' (Poison); the loss itself is non-finite"
    # head.bias gets d(sum)/d(out) = 1: finite; everything upstream of the NaN is NaN
    assert failing(guard, loss) == {
        name: ("non_finite", where)
        for name in ["enc.weight", "enc.bias", "mid.fc.weight", "mid.fc.bias", "head.weight"]
    }


def test_the_innermost_module_that_made_the_nan_is_named_inside_its_sub_model():
    mid = nn.Sequential(linear(3, 3), nn.Identity())
    model = three_stages(mid)
    guard = GradientGuard(model)
    with torch.no_grad():
        mid[0].bias.fill_(float("inf"))  # Linear '0' makes Inf; Identity and the stage only pass it on
    model(X).sum().backward()
    where = "step 1: first non-finite output in forward: 'mid.0' (Linear), in sub-model 'mid'"
    assert set(failing(guard, None, pass_loss=False).values()) == {("non_finite", where)}


def test_a_non_finite_input_is_named_as_the_data():
    model = three_stages(linear(3, 3))
    guard = GradientGuard(model)
    x = X.clone()
    x[0, 0] = float("nan")
    loss = model(x).sum()
    loss.backward()
    where = "step 1: the input of recorded call 1 is already non-finite (the data); the loss itself is non-finite"
    assert set(failing(guard, loss).values()) == {("non_finite", where)}


def test_a_finite_forward_with_a_non_finite_loss_names_the_first_bad_gradient_and_the_loss():
    model = three_stages(linear(3, 3))
    guard = GradientGuard(model)
    loss = torch.sqrt(model(X) - 10.0).sum()  # NaN made by the loss, after the model
    loss.backward()
    where = (
        "step 1: the forward is finite; first non-finite gradient in backward order: 'head.weight';"
        " the loss itself is non-finite"
    )
    found = failing(guard, loss)
    assert found == {name: ("non_finite", where) for name, _ in model.named_parameters()}


def test_a_gradient_that_goes_non_finite_in_backward_is_named_when_forward_and_loss_are_finite():
    model = three_stages(SqrtOfZero())
    guard = GradientGuard(model)
    loss = model(X).sum()
    loss.backward()
    where = (
        "step 1: the forward is finite; first non-finite gradient in backward order: 'mid.fc.weight';"
        " the loss is finite"
    )
    assert failing(guard, loss) == {
        name: ("non_finite", where) for name in ["enc.weight", "enc.bias", "mid.fc.weight", "mid.fc.bias"]
    }


def test_the_healthy_check_never_replays_and_the_search_leaves_random_state_and_buffers_alone(monkeypatch):
    replays = []
    real = non_finite_source.replay_for_source
    monkeypatch.setattr(non_finite_source, "replay_for_source", lambda *a: replays.append(1) or real(*a))
    model = Sequential({"enc": linear(3, 3), "norm": nn.BatchNorm1d(3), "drop": nn.Dropout(0.5), "mid": Poison()})
    guard = GradientGuard(model)
    for _ in range(3):
        model(X).sum().backward()
        assert guard.check().ok
    # no per-module work when healthy (the model's own forward hook is the guard's, for compiled calls)
    assert replays == [] and not any(m._forward_hooks for m in model.modules() if m is not model)
    model.mid.on = True
    model(X).sum().backward()
    rng, stats = torch.get_rng_state(), model.norm.running_mean.clone()
    with pytest.raises(GradientFlowError):
        guard.check()
    assert replays == [1]
    assert torch.equal(torch.get_rng_state(), rng) and torch.equal(model.norm.running_mean, stats)
