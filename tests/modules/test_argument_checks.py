"""Arguments of the composites checked where they enter: a class for an object, a non-bool switch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from composites import Conditional, Parallel, Sequential


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: Parallel({"a": nn.Identity()}, combine=nn.Identity),
            "Parallel combine is the class Identity, not an object of it: pass Identity(...), an instance",
        ),
        (
            lambda: Conditional({"a": nn.Identity(), "b": nn.Identity()}, router=nn.Linear),
            "Conditional router is the class Linear, not an object of it: pass Linear(...), an instance",
        ),
        (
            lambda: Sequential({"encoder": nn.Linear, "head": nn.Identity()}),
            "stage entry 'encoder' is the class Linear, not an object of it: pass Linear(...), an instance",
        ),
        (
            lambda: Parallel({"a": nn.ReLU}),
            "branch entry 'a' is the class ReLU, not an object of it: pass ReLU(...), an instance",
        ),
        (
            lambda: Sequential({"encoder": nn.Identity()}, outputs={"encoder": nn.Flatten}),
            "outputs['encoder'] is the class Flatten, not an object of it: pass Flatten(...), an instance",
        ),
        (
            lambda: Parallel({"a": nn.Identity()}, streams="false"),
            "Parallel streams='false' must be True or False, got a str",
        ),
    ],
    ids=["combine", "router", "stage", "branch", "outputs", "streams"],
)
def test_a_class_where_an_object_is_wanted_or_a_string_switch_is_refused(build, message):
    with pytest.raises(TypeError) as info:
        build()
    assert str(info.value) == message


def test_a_bool_capacity_factor_is_refused():
    with pytest.raises(ValueError, match=r"^capacity_factor=True must be a positive finite number"):
        Conditional({"a": nn.Identity(), "b": nn.Identity()}, router=nn.Linear(2, 2), capacity_factor=True)


def test_a_combine_function_still_works():
    model = Parallel({"a": nn.Identity()}, combine=lambda outputs: outputs["a"] * 2)
    assert model(torch.ones(1, 2)).tolist() == [[2.0, 2.0]]
