"""Scaled gradients: an overflow step the GradScaler skips is not a crash; a real NaN still is."""

import pytest
import torch

from composites import GradientFlowError, GradientGuard, Sequential
from tests.guard.buggy_models import linear

X = torch.ones(4, 3)


def setup(patience: int = 20):
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the first steps overflow float32
    return model, optimizer, scaler, GradientGuard(model, optimizer, scaler=scaler, overflow_patience=patience)


def test_overflow_step_is_let_through_and_the_scaler_skips_it():
    model, optimizer, scaler, guard = setup()
    before = model.head.weight.detach().clone()
    loss = (model(X) * 1e10).sum()
    scaler.scale(loss).backward()
    report = guard.check(loss=loss)
    assert report.ok and report.overflow
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(model.head.weight, before)  # skipped
    assert scaler.get_scale() == 2.0**126


def test_nan_in_the_loss_is_not_an_overflow():
    model, optimizer, scaler, guard = setup()
    loss = (model(X) * torch.tensor(float("nan"))).sum()
    scaler.scale(loss).backward()
    with pytest.raises(GradientFlowError) as caught:
        guard.check(loss=loss)
    assert {p.cause for p in caught.value.problems} == {"non_finite"}


def test_overflow_every_step_for_longer_than_the_patience_is_reported():
    model, optimizer, scaler, guard = setup(patience=2)
    for step in range(3):
        optimizer.zero_grad()
        loss = (model(X) * 1e30).sum()  # finite loss; scaled by 2**127, its gradients overflow
        scaler.scale(loss).backward()
        if step < 2:
            assert guard.check(loss=loss).overflow
    with pytest.raises(GradientFlowError):
        guard.check(loss=loss)


def test_without_a_scaler_inf_gradients_are_non_finite():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    guard = GradientGuard(model)
    out = model(X)
    loss = torch.sqrt(out - out.detach()).sum()  # zero in forward, inf in backward: d sqrt(u)/du at 0
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(GradientFlowError) as caught:
        guard.check()
    assert {p.cause for p in caught.value.problems} == {"non_finite"}


def test_overflow_is_flagged_only_on_steps_let_through_and_a_nan_loss_does_not_count():
    model = linear(3, 1)
    scaler = torch.amp.GradScaler("cpu")
    guard = GradientGuard(model, scaler=scaler, overflow_patience=1)
    loss = (model(X) * float("nan")).sum()
    loss.backward()
    report = guard.check(raise_error=False, loss=loss)
    assert [p.cause for p in report.problems] == ["non_finite", "non_finite"] and not report.overflow
    verdicts = []
    for _ in range(2):
        model.zero_grad()
        loss = torch.nan_to_num((model(X) * 1e39).sum())  # a finite loss, infinite gradients
        loss.backward()
        report = guard.check(raise_error=False, loss=loss)
        verdicts.append((len(report.problems), report.overflow))
    assert verdicts == [(0, True), (2, False)]  # let through once (the patience), then reported
