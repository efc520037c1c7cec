"""The seam between the guard and its diagnosis: a record of the step, public methods, refreshable parameters."""

import ast
import inspect

import torch
from torch import nn

import composites.guard.diagnosis as diagnosis_module
import composites.guard.hooks as hooks_module
from composites import GradientGuard, Sequential
from composites.guard import RecordedCall, StepRecord
from composites.guard.diagnosis import diagnose
from tests.stand_ins import linear

X = torch.ones(4, 3)


def private_reads(module) -> set[str]:
    """``name._attr`` reads in a module's source where ``name`` is not ``self``/``cls``/a torch object."""
    found = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id not in ("self", "cls", "torch"):
                found.add(f"{node.value.id}.{node.attr}")
    return found


def test_the_diagnosis_reads_a_record_of_the_step_not_the_guard():
    source = inspect.getsource(diagnosis_module)
    assert "gradient_guard" not in source and "GradientGuard" not in source
    assert private_reads(diagnosis_module) == set()
    assert {r for r in private_reads(hooks_module) if r.startswith("guard.")} == set()


def test_a_hand_built_record_is_diagnosed_like_the_guards_own():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    names, params = map(list, zip(*model.named_parameters()))
    model.head(model.encoder(X).detach()).sum().backward()
    calls = [RecordedCall(model.encoder, (X,), {}), RecordedCall(model.head, (model.encoder(X).detach(),), {})]
    step = StepRecord(model, names, params, {n: n.split(".")[0] for n in names}, calls)
    problems = diagnose(step, {0, 1}, False, [])
    assert {(p.parameter, p.cause) for p in problems} == {("encoder.weight", "detached"), ("encoder.bias", "detached")}
    assert problems[0].where.startswith("between 'encoder' and 'head'")


def test_the_forward_pre_hook_records_through_the_public_record_call():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    guard = GradientGuard(model)
    seen = []
    guard.record_call = lambda module, args, kwargs: seen.append(type(module).__name__)  # what the hook calls
    model(X)
    assert seen == ["Sequential", "Linear", "Linear"]


def test_refreshed_parameters_are_the_ones_checked():
    model = Sequential({"encoder": linear(3, 3), "head": linear(3, 2)})
    guard = GradientGuard(model)
    model.head.weight = nn.Parameter(torch.full((2, 3), 0.1))  # replaced, as sharding or a reload does
    guard.refresh_parameters()
    model.head(model.encoder(X).detach()).sum().backward()
    report = guard.check(raise_error=False)
    assert {p.parameter for p in report.problems} == {"encoder.weight", "encoder.bias"}
    assert guard.params[guard.names.index("head.weight")] is model.head.weight
    model(X).sum().backward()
    assert guard.check().ok
