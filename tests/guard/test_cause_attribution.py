"""Which cause and where: the guard names the real cause wherever the cut sits (the loop, a parent, a router)."""

import torch
import torch.nn.functional as F
from torch import nn

from composites import Conditional, GradientGuard, Sequential
from tests.guard.buggy_models import Detaching, linear, problems

X = torch.ones(4, 3)


def test_a_sub_model_the_loop_runs_under_no_grad_is_no_grad():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    guard = GradientGuard(model)
    with torch.no_grad():
        features = model.encoder(X)
    model.head(features).sum().backward()
    where = "'encoder' ran under torch.no_grad()/inference_mode(), in the code that calls it"
    assert problems(guard, "cause", "where") == {
        "encoder.weight": ("no_grad", where),
        "encoder.bias": ("no_grad", where),
    }


def test_the_models_own_call_is_replayed_however_many_child_calls_its_forward_made():
    model = Sequential([Detaching()] + [linear(3, 3) for _ in range(19)])  # 20 stage calls in one forward
    guard = GradientGuard(model)
    model(X).sum().backward()
    where = "inside '0'.forward, after '0.fc'"
    assert problems(guard, "cause", "where") == {
        "0.fc.weight": ("detached", where),
        "0.fc.bias": ("detached", where),
    }


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
    assert problems(guard, "cause", "where") == {
        "scales.0": ("detached", "inside Scaled.forward: its output does not depend on this parameter"),
        "scales.1": ("no_grad", "inside Scaled.forward, used under torch.no_grad()/inference_mode()"),
    }
    guard = GradientGuard(model := Tied())
    model(X).sum().backward()
    assert problems(guard, "cause", "where") == {
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
    assert problems(guard, "cause", "where") == {name: ("detached", where) for name in expected}


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
    assert problems(guard, "module", "cause") == {"layer.gains['a']": ("layer", "not_registered")}
