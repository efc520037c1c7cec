"""Regressions from the guard review: each case a model that once got a wrong verdict or a crash."""

import copy
import gc
import io
import math
import pickle
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from composites import Conditional, GradientFlowError, GradientGuard, Problem, Sequential
from tests.guard.buggy_models import linear

X = torch.ones(4, 3)


def causes(guard: GradientGuard) -> dict[str, tuple[str, str]]:
    """{parameter: (cause, where)} of a check that must find problems."""
    report = guard.check(raise_error=False)
    assert not report.ok
    return {p.parameter: (p.cause, p.where) for p in report.problems}


class Detaching(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).detach()


def test_a_forward_made_before_the_guard_existed_does_not_count_as_routing_of_the_first_step():
    model = Conditional({"a": linear(3, 2), "b": linear(3, 2)}, router=None)
    model(X, route="b")  # a shape check with gradients on, before the guard is built
    guard = GradientGuard(model)
    model(X, route="a").sum().backward()
    report = guard.check()
    assert report.inactive_names == ["b.bias", "b.weight"]


def test_sparse_embedding_gradients_are_checked_normed_and_named_when_not_finite():
    embedding = nn.Embedding(5, 3, sparse=True)
    nn.init.constant_(embedding.weight, 1.0)
    model = nn.Sequential(embedding, linear(3, 1))
    guard = GradientGuard(model)
    model(torch.tensor([1, 2, 1])).sum().backward()  # rows 1 (twice) and 2: an uncoalesced sparse gradient
    assert embedding.weight.grad.is_sparse
    report = guard.check()
    assert report.grad_norms()["0"] == pytest.approx(math.sqrt(3 * 0.2**2 + 3 * 0.1**2), rel=1e-6)
    model(torch.tensor([3])).sum().backward()
    embedding.weight.grad = torch.sparse_coo_tensor([[3]], [[float("nan"), 0.0, 0.0]], (5, 3), check_invariants=True)
    where = "step 2: the forward is finite; first non-finite gradient in backward order: '0.weight'"
    assert causes(guard) == {"0.weight": ("non_finite", where)}


def test_a_lazy_module_is_guarded_from_the_backward_after_it_materialized():
    model = nn.Sequential(nn.LazyLinear(3), linear(3, 2))
    guard = GradientGuard(model)
    model(X).sum().backward()
    assert guard.check().checked == 4
    model[1](model[0](X).detach()).sum().backward()
    assert {name: cause for name, (cause, _) in causes(guard).items()} == {"0.weight": "detached", "0.bias": "detached"}


def test_a_guarded_model_is_copied_and_saved_whole_without_its_guard():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    guard = GradientGuard(model)
    loss = model(X).sum()
    teacher = copy.deepcopy(model)  # between forward and check, with the step's calls recorded
    loss.backward()
    assert guard.check().ok
    saved = io.BytesIO()
    torch.save(model, saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    for other in (teacher, loaded):
        other(X).sum().backward()  # their forwards and backwards record nothing into the guard
    assert not guard._root_calls and not guard._calls and not guard._reached
    for hook in model.encoder.weight._backward_hooks.values():  # the guard's per-parameter hook, copied
        copy.deepcopy(hook)(torch.ones(1))
        pickle.loads(pickle.dumps(hook))(torch.ones(1))
    assert not guard._reached
    model(X).sum().backward()
    assert guard.check().ok
    alive = weakref.ref(guard)
    del guard
    gc.collect()
    assert alive() is None  # neither the model nor its copies keep a guard alive


def test_a_sub_model_the_loop_runs_under_no_grad_is_no_grad():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    guard = GradientGuard(model)
    with torch.no_grad():
        features = model.encoder(X)
    model.head(features).sum().backward()
    where = "'encoder' ran under torch.no_grad()/inference_mode(), in the code that calls it"
    assert causes(guard) == {"encoder.weight": ("no_grad", where), "encoder.bias": ("no_grad", where)}


def test_the_models_own_call_is_replayed_however_many_child_calls_its_forward_made():
    model = Sequential([Detaching()] + [linear(3, 3) for _ in range(19)])  # 20 stage calls in one forward
    guard = GradientGuard(model)
    model(X).sum().backward()
    where = "inside '0'.forward, after '0.fc'"
    assert causes(guard) == {"0.fc.weight": ("detached", where), "0.fc.bias": ("detached", where)}


def test_parameters_their_parent_uses_itself_get_the_real_cause_not_unused():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = linear(3, 3)
            self.scales = nn.ParameterList([nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))])

        def forward(self, x):
            with torch.no_grad():
                shift = self.scales[1] * 2
            return self.fc(x) * self.scales[0].detach() + shift

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = linear(3, 3), linear(3, 1)

        def forward(self, x):
            return F.linear(self.fc(x), self.out.weight.detach(), self.out.bias)

    guard = GradientGuard(model := Scaled())
    model(X).sum().backward()
    assert causes(guard) == {
        "scales.0": ("detached", "inside Scaled.forward: its output does not depend on this parameter"),
        "scales.1": ("no_grad", "inside Scaled.forward, used under torch.no_grad()/inference_mode()"),
    }
    guard = GradientGuard(model := Tied())
    model(X).sum().backward()
    assert causes(guard) == {
        "out.weight": ("detached", "inside Tied.forward: its output does not depend on this parameter")
    }


def test_a_soft_router_whose_conditional_output_is_detached_is_detached_not_a_hard_route():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.moe = Conditional({"a": linear(3, 3), "b": linear(3, 3)}, router=linear(3, 2), top_k=2)
            self.head = linear(3, 1)

        def forward(self, x):
            return self.head(self.moe(x).detach())

    guard = GradientGuard(model := Model())
    model(X).sum().backward()
    where = "inside Model.forward, after 'moe', before 'head'"
    expected = [f"moe.{m}.{w}" for m in ("a", "b", "router") for w in ("weight", "bias")]
    assert causes(guard) == {name: ("detached", where) for name in expected}


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


def test_trainable_tensors_in_a_dict_attribute_are_not_registered():
    class Gains(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = linear(3, 2)
            self.gains = {"a": torch.ones(2, requires_grad=True)}

        def forward(self, x):
            return self.fc(x) * self.gains["a"]

    guard = GradientGuard(model := Sequential({"layer": Gains()}))
    model(X).sum().backward()
    report = guard.check(raise_error=False)
    assert [(p.parameter, p.module, p.cause) for p in report.problems] == [
        ("layer.gains['a']", "layer", "not_registered")
    ]


def test_gradient_flow_error_survives_pickle_and_copy():
    error = GradientFlowError([Problem("encoder.weight", "encoder", "detached", "after 'encoder'")])
    for back in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
        assert type(back) is GradientFlowError
        assert back.problems == error.problems and str(back) == str(error)
