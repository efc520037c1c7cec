"""A Sequential as a pipeline over gloo ranks: the single-process numbers, the hand-off, the guard per stage.

The ranks are the session's one spawn (``tests.gloo_ranks``): each scenario below serves several
tests, and fails only its own when it breaks.
"""

from __future__ import annotations

import pytest
from torch import nn

from composites import Sequential
from composites.parallelism import balanced_split, check_split
from composites.parallelism.pipeline import microbatch_count
from tests import gloo_ranks

TOL = 1e-5
WORKERS = "tests.parallelism.pipeline_workers"
NUMERICS_TWO = gloo_ranks.scenario("pipeline-numerics-2", 2, f"{WORKERS}:numerics")
NUMERICS_FOUR = gloo_ranks.scenario("pipeline-numerics-4", 4, f"{WORKERS}:numerics")
HANDOFF = gloo_ranks.scenario("pipeline-handoff", 2, f"{WORKERS}:handoff_cases")
GUARD = gloo_ranks.scenario("pipeline-guard", 2, f"{WORKERS}:guard_cases")


def check_numerics(ranks: list[dict], split: list[list[str]]) -> None:
    for schedule in ("gpipe", "1f1b"):
        seen = [r[schedule] for r in ranks]
        assert all(s["split"] == split for s in seen)
        # every parameter is on exactly one rank, under its single-process name
        held = [name for s in seen for name in s["names"]]
        expected = [f"{stage}.0.{p}" for stage in ("encoder", "mixer", "proj") for p in ("weight", "bias")]
        assert sorted(held) == sorted([*expected, "head.weight", "head.bias"])
        assert all(s["param_error"] <= TOL for s in seen), [s["param_error"] for s in seen]
        assert seen[-1]["loss_error"] <= TOL and seen[-1]["output_shape"] == [8, 3]
        assert all(s["loss_error"] is None for s in seen[:-1])  # the loss lives on the last stage only


@pytest.mark.slow
@gloo_ranks.SHARED
def test_two_stages_step_as_the_single_process_model() -> None:
    two = gloo_ranks.outcome(NUMERICS_TWO)
    check_numerics(two, [["encoder", "mixer"], ["proj", "head"]])
    assert two[0]["gpipe"]["layout"] == "pipeline: stage 0 [encoder, mixer] on rank 0 | stage 1 [proj, head] on rank 1"


@pytest.mark.slow
@gloo_ranks.SHARED
def test_four_stages_step_as_the_single_process_model() -> None:
    check_numerics(gloo_ranks.outcome(NUMERICS_FOUR), [["encoder"], ["mixer"], ["proj"], ["head"]])


@pytest.mark.slow
@gloo_ranks.SHARED
def test_interleaved_schedule_holds_two_stages_per_rank_and_steps_the_same() -> None:
    seen = [r["interleaved"] for r in gloo_ranks.outcome(NUMERICS_TWO)]
    assert [s["names"] for s in seen] == [
        ["encoder.0.bias", "encoder.0.weight", "proj.0.bias", "proj.0.weight"],
        ["head.bias", "head.weight", "mixer.0.bias", "mixer.0.weight"],
    ]
    assert all(s["param_error"] <= TOL for s in seen) and seen[1]["loss_error"] <= TOL


@pytest.mark.slow
@gloo_ranks.SHARED
def test_copies_of_a_pipeline_on_halves_of_the_batch_step_as_one_model() -> None:
    seen = [r["pp_x_dp"] for r in gloo_ranks.outcome(NUMERICS_FOUR)]
    assert [s["layout"] for s in seen[::2]] == [
        "pipeline: stage 0 [encoder, mixer] on rank 0 | stage 1 [proj, head] on rank 1",
        "pipeline: stage 0 [encoder, mixer] on rank 2 | stage 1 [proj, head] on rank 3",
    ]
    assert all(s["param_error"] <= TOL for s in seen)
    assert seen[1]["loss_error"] <= TOL and seen[3]["loss_error"] <= TOL


@pytest.mark.slow
@gloo_ranks.SHARED
def test_tuples_mappings_and_picked_fields_cross_a_boundary() -> None:
    two = gloo_ranks.outcome(HANDOFF)
    for kind in ("tuple", "mapping", "picked"):
        assert two[1][kind]["loss_error"] <= TOL
        assert max(r[kind]["grad_error"] for r in two) <= TOL


@pytest.mark.slow
@gloo_ranks.SHARED
def test_an_output_that_cannot_be_sent_is_named_on_every_rank() -> None:
    messages = [r["unsendable"] for r in gloo_ranks.outcome(HANDOFF)]
    assert messages[0] == messages[1]
    assert "the output of stage 'labelled' cannot be sent" in messages[0]
    assert "holding a str" in messages[0] and "outputs={'labelled'" in messages[0]


@pytest.mark.slow
@gloo_ranks.SHARED
def test_guard_passes_a_connected_pipeline() -> None:
    assert [r["clean"]["problems"] for r in gloo_ranks.outcome(GUARD)] == [[], []]


def problems(case: str) -> dict[str, tuple[str, str]]:
    verdicts = [r[case]["problems"] for r in gloo_ranks.outcome(GUARD)]
    assert verdicts[0] == verdicts[1]  # every rank raised the same table
    return {name: (cause, where) for name, cause, where in verdicts[0]}


@pytest.mark.slow
@gloo_ranks.SHARED
def test_guard_names_the_boundary_a_detached_output_was_sent_over() -> None:
    found = problems("boundary")
    upstream = {"encoder.0.weight", "encoder.0.bias", "mixer.inner.0.weight", "mixer.inner.0.bias"}
    assert set(found) == upstream
    boundary = "between stage 'mixer' (rank 0) and stage 'proj' (rank 1): "
    assert all(cause == "detached" and where.startswith(boundary) for cause, where in found.values())
    assert "sent without gradient" in found["encoder.0.weight"][1]


@pytest.mark.slow
@gloo_ranks.SHARED
def test_guard_names_the_boundary_whose_receiver_drops_the_gradient() -> None:
    found = problems("received")
    assert set(found) == {"encoder.0.weight", "encoder.0.bias", "mixer.0.weight", "mixer.0.bias"}
    where = found["mixer.0.weight"][1]
    assert where.startswith("between stage 'mixer' (rank 0) and stage 'proj' (rank 1): ")
    assert "'proj' received it with gradient but no gradient came back" in where


@pytest.mark.slow
@gloo_ranks.SHARED
def test_guard_names_a_cut_inside_a_stage_by_parameter() -> None:
    found = problems("inside")
    assert found == {
        "encoder.inner.0.weight": ("detached", "inside 'encoder'.forward, after 'encoder.inner'"),
        "encoder.inner.0.bias": ("detached", "inside 'encoder'.forward, after 'encoder.inner'"),
    }


# ---------------------------------------------------------------- the split, no processes
def model() -> Sequential:
    return Sequential({"encoder": nn.Linear(8, 8), "proj": nn.Linear(8, 8), "head": nn.Linear(8, 2)})


def test_balanced_split_keeps_the_largest_group_smallest() -> None:
    assert balanced_split(model(), 2) == [["encoder"], ["proj", "head"]]  # 72 | 72+18
    assert balanced_split(model(), 3) == [["encoder"], ["proj"], ["head"]]


def test_a_split_with_too_many_stages_says_how_many_fit() -> None:
    with pytest.raises(ValueError, match="4 pipeline stages asked for a Sequential of 3 stage"):
        balanced_split(model(), 4)


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ([["encoder"], ["head"]], "in order, each once"),
        ([["encoder", "proj", "head"]], "1 group\\(s\\) for 2 pipeline stages"),
        ([["encoder", "decoder"], ["head"]], "'decoder' not stage\\(s\\) of the Sequential"),
        ([["proj"], ["encoder", "head"]], "in order, each once"),
    ],
)
def test_a_wrong_split_is_refused_with_an_example(split: list[list[str]], message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        check_split(model(), split, 2)
    assert "split=[[encoder], [proj, head]]" in str(error.value)


def test_microbatches_split_a_batch_evenly() -> None:
    assert [microbatch_count(n, 4) for n in (64, 30, 7, 2)] == [4, 3, 1, 2]
