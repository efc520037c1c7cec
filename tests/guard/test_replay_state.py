"""The replay that names a cause re-runs the forward that happened: same random draws, same buffers."""

import pytest
import torch
from torch import nn

from composites import GradientGuard, Sequential
from tests.guard.buggy_models import linear, problems


class LayerDrop(nn.Module):
    """Skips ``a`` at random, as LayerDrop and stochastic depth do (the repro of issue 11)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) if torch.rand(()) < 0.5 else x)


class Warmup(nn.Module):
    """Runs ``a`` only from its second forward on: the path depends on a buffer the forward changes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = linear(4, 4), linear(4, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.b(self.a(x) if self.calls > 1 else x)


def seeded_reports(build, seeds: int, micro_batches: int = 1, x=lambda: torch.randn(2, 4)):
    """One guarded step per seed: (seed, report); the loop draws between micro-batches, as augmentation does."""
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = build()
        guard = GradientGuard(model)
        for _ in range(micro_batches):
            model(x()).sum().backward()
            torch.rand(5)
        yield seed, guard.check(raise_error=False)


def test_a_layer_dropped_at_random_is_unused_whatever_the_replay_would_draw():
    where = "'a' never ran in forward, though the model (LayerDrop) did"
    dropped_steps = 0
    for seed, report in seeded_reports(LayerDrop, 12):
        dropped_steps += not report.ok
        assert {p.parameter: (p.cause, p.where) for p in report.problems} in (
            {},
            {"a.weight": ("unused", where), "a.bias": ("unused", where)},
        ), f"seed {seed}"
    assert dropped_steps >= 3  # the draw went both ways across these seeds


def test_the_replay_starts_from_the_buffers_the_forward_started_from():
    model = Warmup()
    guard = GradientGuard(model)
    model(torch.ones(2, 4)).sum().backward()  # first forward: 'a' skipped because calls == 1
    assert problems(guard, "cause", "where") == {
        "a.weight": ("unused", "'a' never ran in forward, though the model (Warmup) did"),
        "a.bias": ("unused", "'a' never ran in forward, though the model (Warmup) did"),
    }
    assert int(model.calls) == 1  # the replay put the buffer back
    model(torch.ones(2, 4)).sum().backward()
    assert guard.check().ok


def test_each_accumulated_micro_batch_replays_with_its_own_random_draws():
    failed = 0
    for seed, report in seeded_reports(LayerDrop, 16, micro_batches=2):  # gradient accumulation: one check
        failed += not report.ok
        assert {p.cause for p in report.problems} <= {"unused"}, f"seed {seed}"
    assert failed >= 2  # 'a' was dropped in both micro-batches for some seeds


def test_dropout_masks_are_the_ones_of_the_step():
    class Gated(nn.Module):  # 'a' reaches the output only where dropout keeps the gate's unit
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = linear(4, 1), linear(4, 4)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            gate = self.drop(torch.ones(1))
            return self.b(x) + (self.a(x) * gate if gate.item() > 0 else self.a(x).detach())

    failed = 0
    for seed, report in seeded_reports(Gated, 8, x=lambda: torch.ones(2, 4)):
        assert {p.cause for p in report.problems} <= {"detached"}, f"seed {seed}"
        if not report.ok:
            failed += 1
            assert {p.parameter for p in report.problems} == {"a.weight", "a.bias"}
            assert {p.where for p in report.problems} == {"inside Gated.forward, after 'a'"}
    assert 0 < failed < 8  # the mask went both ways across these seeds


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_random_draws_are_replayed_too():
    class CudaDrop(LayerDrop):
        def forward(self, x):
            return self.b(self.a(x) if torch.rand((), device=x.device) < 0.5 else x)

    for seed, report in seeded_reports(lambda: CudaDrop().cuda(), 8, x=lambda: torch.randn(2, 4, device="cuda")):
        assert {p.cause for p in report.problems} <= {"unused"}, f"seed {seed}"


def test_a_healthy_step_copies_the_buffers_once_however_many_forwards_it_records(monkeypatch):
    copies = []
    fused_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda *a, **k: copies.append(1) or fused_copy(*a, **k))
    model = Sequential({"norm": nn.BatchNorm1d(4), "a": linear(4, 4), "b": linear(4, 4)})
    guard = GradientGuard(model)
    for step in range(3):
        for _ in range(2):  # two accumulated micro-batches: two recorded calls of the model
            model(torch.randn(2, 4)).sum().backward()
        assert guard.check().ok
        assert len(copies) == step + 1
    model.b(model.a(model.norm(torch.randn(2, 4)))).sum().backward()  # the loop calls the sub-models itself
    assert guard.check().ok and len(copies) == 4


class OneShot(nn.Module):
    """Refuses a second forward (a consumed iterator, a one-shot cache): the guard's replay of it raises."""

    def __init__(self, poison: bool = False) -> None:
        super().__init__()
        self.a, self.b = linear(4, 4), linear(4, 4)
        self.poison, self.calls = poison, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("one forward only")
        return self.b(self.a(x).detach()) * (float("nan") if self.poison else 1.0)


def test_a_replay_that_raises_is_said_not_hidden():
    model = OneShot()
    guard = GradientGuard(model)
    model(torch.ones(2, 4)).sum().backward()
    with pytest.warns(RuntimeWarning, match=r"could not replay the recorded forward .*RuntimeError: one forward only"):
        report = guard.check(raise_error=False)
    assert {p.parameter for p in report.problems} == {"a.weight", "a.bias"}


def test_a_nan_source_replay_that_raises_does_not_claim_the_forward_is_finite():
    model = OneShot(poison=True)
    guard = GradientGuard(model, may_skip=["a.*"])  # only the non-finite search replays
    model(torch.ones(2, 4)).sum().backward()
    with pytest.warns(RuntimeWarning, match="to find the NaN/Inf source"):
        report = guard.check(raise_error=False)
    assert {p.where for p in report.problems} == {
        "step 1: the recorded forward could not be replayed; first non-finite gradient in backward order: 'b.weight'"
    }
