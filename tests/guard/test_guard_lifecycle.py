"""A guard's life beside its model: built late, on a lazy model, and left behind when the model is copied or saved."""

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
from torch import nn

from composites import Conditional, GradientGuard, Sequential
from tests.guard.buggy_models import linear, problems

X = torch.ones(4, 3)


def test_a_forward_made_before_the_guard_existed_does_not_count_as_routing_of_the_first_step():
    model = Conditional({"a": linear(3, 2), "b": linear(3, 2)}, router=None)
    model(X, route="b")  # a shape check with gradients on, before the guard is built
    guard = GradientGuard(model)
    model(X, route="a").sum().backward()
    report = guard.check()
    assert report.inactive_names == ["b.bias", "b.weight"]


def test_a_lazy_module_is_guarded_from_the_backward_after_it_materialized():
    model = nn.Sequential(nn.LazyLinear(3), linear(3, 2))
    guard = GradientGuard(model)
    model(X).sum().backward()
    assert guard.check().checked == 4
    model[1](model[0](X).detach()).sum().backward()
    assert problems(guard, "cause") == {"0.weight": "detached", "0.bias": "detached"}


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
    for hook in model.encoder.weight._backward_hooks.values():  # the guard's per-parameter hook, copied
        copy.deepcopy(hook)(torch.ones(1))
        pickle.loads(pickle.dumps(hook))(torch.ones(1))
    # none of the model's own gradients reached the guard since its last check: every parameter is unused
    assert problems(guard, "cause") == dict.fromkeys(
        ["encoder.weight", "encoder.bias", "head.weight", "head.bias"], "unused"
    )
    model.head(model.encoder(X).detach()).sum().backward()  # a cut the copies' calls must not hide
    found = problems(guard, "cause", "where")
    assert {name: cause for name, (cause, _) in found.items()} == {
        "encoder.weight": "detached",
        "encoder.bias": "detached",
    }
    assert all(
        where.startswith("between 'encoder' and 'head', in the code that calls them") for _, where in found.values()
    )
    model(X).sum().backward()
    assert guard.check().ok
    copy_guard = GradientGuard(loaded)  # the loaded copy takes a guard of its own, as a fresh model would
    loaded.head(loaded.encoder(X).detach()).sum().backward()
    assert problems(copy_guard, "cause") == {"encoder.weight": "detached", "encoder.bias": "detached"}
    assert set(problems(guard, "cause").values()) == {"unused"}  # the first guard saw none of it
    alive = weakref.ref(guard)
    del guard
    gc.collect()
    assert alive() is None  # neither the model nor its copies keep a guard alive


def test_a_guard_refused_for_a_bad_may_skip_pattern_leaves_no_hook_on_the_model():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    with pytest.raises(ValueError, match="may_skip pattern 'experts.*' matches no parameter name"):
        GradientGuard(model, may_skip=["experts.*"])
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert not any(p._backward_hooks for p in model.parameters())
