"""A user's combine is named when it fails or when what it returned makes the next stage fail."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from composites import Parallel, Sequential, StageError


def stacked(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(outputs.values()), dim=1)  # (batch, 2, 8): the head wanted (batch, 16)


def fused(combine) -> Sequential:
    branches = {"a": nn.Linear(4, 8), "b": nn.Linear(4, 8)}
    return Sequential({"fuse": Parallel(branches, combine=combine), "head": nn.Sequential(nn.Linear(16, 3), nn.ReLU())})


def test_the_next_stage_failing_on_a_combines_output_blames_the_combine_with_what_the_stage_takes():
    with pytest.raises(StageError) as info:
        fused(stacked)(torch.zeros(2, 4))
    error = info.value
    assert (error.stage, error.producer, error.received) == ("head", "fuse", "Tensor[2, 2, 8]")
    assert str(error) == (
        "combine of 'fuse' returned Tensor[2, 2, 8], but 'head' takes 16 features on the last dimension (Linear): "
        "check that combine. stage 'head' (Sequential) failed on it: RuntimeError: "
        "mat1 and mat2 shapes cannot be multiplied (4x8 and 16x3)"
    )


def test_the_blame_keeps_its_full_path_when_nested_and_survives_pickling():
    outer = Sequential({"body": fused(stacked)})
    with pytest.raises(StageError) as info:
        outer(torch.zeros(2, 4))
    assert (info.value.stage, info.value.producer) == ("body.head", "body.fuse")
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


def test_a_combine_that_raises_is_named_as_the_combine_of_its_parallel():
    def broken(outputs):
        raise ValueError("no such mode")

    with pytest.raises(StageError) as info:
        Sequential({"body": fused(broken)})(torch.zeros(2, 4))
    assert (info.value.stage, info.value.role) == ("body.fuse", "combine")
    assert str(info.value) == (
        "combine of 'body.fuse' (Parallel, combine=broken) failed on the branch outputs "
        "{a: Tensor[2, 8], b: Tensor[2, 8]}: ValueError: no such mode"
    )


def test_a_built_in_combine_and_a_stage_failing_on_its_own_are_not_blamed_on_a_combine():
    model = Sequential({"fuse": Parallel({"a": nn.Linear(4, 8), "b": nn.Linear(4, 8)}), "head": nn.Linear(12, 3)})
    with pytest.raises(StageError) as info:
        model(torch.zeros(2, 4))
    assert info.value.producer is None and str(info.value).startswith(
        "stage 'head' (Linear) failed on input Tensor[2, 16]"
    )

    # the stage after the combine fails inside, on what its own first stage made: not the combine's doing
    head = Sequential({"flatten": nn.Flatten(), "linear": nn.Linear(12, 3)})
    with pytest.raises(StageError) as info:
        Sequential({"fuse": Parallel({"a": nn.Identity(), "b": nn.Identity()}, combine=stacked), "head": head})(
            torch.zeros(2, 4)
        )
    assert (info.value.stage, info.value.producer, info.value.received) == ("head.linear", None, "Tensor[2, 8]")
