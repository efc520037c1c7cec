"""Exact per backward, and no false alarms on the cases widely read articles get wrong."""

import pytest
import torch
from torch import nn

from composites import Conditional, GradientFlowError, GradientGuard, Parallel, Sequential
from tests.guard.buggy_models import linear, problems

X = torch.ones(4, 3)


def two_stage() -> Sequential:
    return Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})


def cut_backward(model: Sequential) -> None:
    model.head(model.encoder(X).detach()).sum().backward()


def test_accumulation_cut_in_second_micro_batch_is_reported_for_that_micro_batch():
    model = two_stage()
    guard = GradientGuard(model)
    model(X).sum().backward()
    assert guard.check().ok
    cut_backward(model)  # encoder grads from micro-batch 1 are still in .grad
    assert model.encoder.weight.grad is not None
    assert set(problems(guard)) == {"encoder.weight", "encoder.bias"}


@pytest.mark.parametrize("zero_before_forward", [True, False])
def test_zero_grad_without_set_to_none_does_not_hide_a_cut(zero_before_forward):
    model = two_stage()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = GradientGuard(model, optimizer)
    model(X).sum().backward()
    guard.check()
    optimizer.step()
    if zero_before_forward:
        optimizer.zero_grad(set_to_none=False)
    out = model.head(model.encoder(X).detach())
    if not zero_before_forward:
        optimizer.zero_grad(set_to_none=False)
    out.sum().backward()
    assert torch.equal(model.encoder.weight.grad, torch.zeros(3, 3))
    assert set(problems(guard)) == {"encoder.weight", "encoder.bias"}


def test_slicing_and_indexing_a_parameter_pass():
    class Sliced(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3, 4))

        def forward(self, x):
            return x @ self.w[:, :2] + self.w[0, 2:]

    model = Sequential({"sliced": Sliced()})
    guard = GradientGuard(model)
    model(X).sum().backward()
    assert guard.check().ok
    expected = torch.tensor([[4.0, 4.0, 4.0, 4.0], [4.0, 4.0, 0.0, 0.0], [4.0, 4.0, 0.0, 0.0]])
    assert torch.equal(model.sliced.w.grad, expected)


def test_exactly_zero_gradient_of_a_dead_relu_passes():
    dead = linear(3, 3, w=-1.0)  # every pre-activation negative for positive inputs
    model = Sequential({"dead": nn.Sequential(dead, nn.ReLU()), "head": linear(3, 2)})
    guard = GradientGuard(model)
    model(X).sum().backward()
    assert guard.check().ok
    assert torch.equal(dead.weight.grad, torch.zeros(3, 3))


def test_augmenting_or_detaching_inputs_passes():
    model = two_stage()
    guard = GradientGuard(model)
    noisy = X + 0.1 * torch.randn_like(X)
    flipped = torch.from_numpy(noisy.detach().numpy()[:, ::-1].copy())
    model(flipped.detach()).sum().backward()
    assert guard.check().ok


def test_inactive_branches_and_frozen_parameters_are_listed_not_raised():
    gate = linear(3, 2)
    nn.init.constant_(gate.weight, 0.0)
    gate.bias.data = torch.tensor([5.0, -5.0])  # every sample goes to branch "a"
    experts = Conditional({"a": linear(3, 2), "b": linear(3, 2)}, router=gate)
    model = Sequential({"encoder": linear(3, 3), "experts": experts})
    model.encoder.requires_grad_(False)
    guard = GradientGuard(model)
    model(X).sum().backward()
    report = guard.check()
    assert experts.active_branches == ("a",)
    assert (report.checked, report.frozen, report.inactive) == (6, 2, 2)
    assert report.frozen_names == ["encoder.bias", "encoder.weight"]
    assert report.inactive_names == ["experts.b.bias", "experts.b.weight"]


def test_batch_routed_branch_is_inactive():
    model = Sequential(
        {
            "encoder": linear(3, 3),
            "route": Conditional({"small": linear(3, 2), "big": linear(3, 2)}, router=lambda x: "small"),
        }
    )
    guard = GradientGuard(model)
    model(X).sum().backward()
    assert guard.check().inactive_names == ["route.big.bias", "route.big.weight"]


def test_a_conditional_that_did_not_run_in_this_forward_is_unused_not_inactive():
    class Skipper(nn.Module):
        def __init__(self):
            super().__init__()
            self.cond = Conditional({"small": linear(3, 2), "big": linear(3, 2)}, router=None)
            self.head = linear(3, 2)

        def forward(self, x, use_cond=True):
            return self.cond(x, route="small") + self.head(x) if use_cond else self.head(x)

    model = Skipper()
    guard = GradientGuard(model)
    model(X).sum().backward()
    assert guard.check().inactive == 2
    model(X, use_cond=False).sum().backward()  # active_branches still says ("small",) from before
    report = guard.check(raise_error=False)
    assert {(p.parameter, p.cause) for p in report.problems} == {
        (f"cond.{b}.{w}", "unused") for b in ("small", "big") for w in ("weight", "bias")
    }


def test_parameter_unfrozen_after_the_guard_was_built_is_checked_from_the_next_backward():
    model = two_stage()
    model.encoder.requires_grad_(False)
    guard = GradientGuard(model)
    model.encoder.requires_grad_(True)
    model(X).sum().backward()
    assert guard.check().checked == 4
    cut_backward(model)
    assert set(problems(guard)) == {"encoder.weight", "encoder.bias"}


def test_nested_composites_and_shared_weights():
    shared = linear(3, 3)
    model = Sequential(
        {
            "encoder": shared,
            "fuse": Parallel({"left": linear(3, 2), "right": nn.Sequential(shared, linear(3, 2))}, combine="sum"),
        }
    )
    guard = GradientGuard(model)
    assert guard.names == [
        "encoder.weight",
        "encoder.bias",
        "fuse.left.weight",
        "fuse.left.bias",
        "fuse.right.1.weight",
        "fuse.right.1.bias",
    ]
    model(X).sum().backward()
    assert guard.check().ok
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(guard.names)


def test_grad_norms_per_sub_model_are_exact():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    guard = GradientGuard(model)
    model(X).sum().backward()
    norms = guard.check().grad_norms()
    expected = {
        name: torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in getattr(model, name).parameters()])).item()
        for name in ("encoder", "head")
    }
    assert norms.keys() == expected.keys()
    assert all(norms[k] == pytest.approx(expected[k], rel=1e-6) for k in expected)


def test_diagnosis_replay_leaves_buffers_and_random_state_untouched():
    model = Sequential(
        {"norm": nn.BatchNorm1d(3), "encoder": linear(3, 3), "drop": nn.Dropout(0.5), "head": linear(3, 2)}
    )
    guard = GradientGuard(model)
    x = torch.randn(8, 3)
    model.head(model.drop(model.encoder(model.norm(x))).detach()).sum().backward()
    stats = model.norm.running_mean.clone(), model.norm.num_batches_tracked.clone()
    rng = torch.get_rng_state()
    set(problems(guard))
    assert torch.equal(model.norm.running_mean, stats[0]) and torch.equal(model.norm.num_batches_tracked, stats[1])
    assert torch.equal(torch.get_rng_state(), rng)


def test_remove_takes_the_hooks_away():
    model = two_stage()
    guard = GradientGuard(model)
    guard.remove()
    model(X).sum().backward()
    assert guard.reached == [] and guard.recorded_calls == []


def test_huge_but_finite_gradients_whose_sum_overflows_are_not_non_finite():
    model = Sequential({"a": linear(3, 3), "b": linear(3, 2)})
    guard = GradientGuard(model)
    model(X).sum().backward()
    for p in model.parameters():
        p.grad.fill_(3e38)  # each finite; their norms and sums overflow to inf in float32
    assert torch.isinf(torch.stack(torch._foreach_norm([p.grad for p in model.parameters()])).sum())
    assert guard.check().ok


@pytest.mark.slow
def test_a_cut_inside_a_torch_compiled_model_is_caught():
    class Cut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = linear(3, 3), linear(3, 2)

        def forward(self, x):
            return self.fc2(self.fc1(x).detach())

    model = Cut()
    guard = GradientGuard(model)
    torch.compile(model)(X).sum().backward()  # the compiled backward hands fc1 a None gradient
    with pytest.raises(GradientFlowError) as caught:
        guard.check()
    assert {(p.parameter, p.cause) for p in caught.value.problems} == {
        ("fc1.weight", "detached"),
        ("fc1.bias", "detached"),
    }
