"""The guard under two-rank gloo DDP: one verdict on every rank, never a rank raising alone."""

import json

import pytest

from tests.guard import ddp_workers
from tests.processes import free_port, spawn_until_written

SCENARIOS = ("one_rank", "unused_everywhere", "detached_where_routed")
TIMEOUT_S = 240  # every scenario of both ranks; a hang fails here, a slow, busy 2-core machine does not


@pytest.fixture(scope="module")
def every_scenario(tmp_path_factory) -> dict[tuple[str, int], list]:
    """Each (scenario, rank)'s verdicts; one pair of spawned ranks runs every scenario; never hangs.

    A scenario neither rank finished is missing from the result: its test fails on its own.
    """
    out = tmp_path_factory.mktemp("ddp")
    paths = {(s, r): out / f"{s}.rank{r}.json" for s in SCENARIOS for r in (0, 1)}
    failed = spawn_until_written(ddp_workers.run, (2, free_port(), SCENARIOS, str(out)), paths.values(), TIMEOUT_S)
    found = {key: json.loads(path.read_text()) for key, path in paths.items() if path.exists()}
    return {"failed": failed, **found}


def run_two_ranks(outcomes: dict, scenario: str) -> dict[int, list]:
    """Each rank's verdicts of ``scenario``; fails when a rank did not write them in time."""
    if any((scenario, rank) not in outcomes for rank in (0, 1)):
        pytest.fail(f"DDP scenario '{scenario}': {outcomes['failed']}")
    return {rank: outcomes[(scenario, rank)] for rank in (0, 1)}


@pytest.mark.slow
def test_branch_active_on_one_rank_only_passes_and_routed_out_branch_is_listed(every_scenario):
    outcomes = run_two_ranks(every_scenario, "one_rank")
    # 'a' runs on rank 0, 'b' on rank 1, so both are reached somewhere; 'c' runs nowhere
    inactive = ["experts.c.bias", "experts.c.weight"]
    for rank in (0, 1):
        assert [status for status, _ in outcomes[rank]] == ["ok"] * 3
    assert outcomes[0][0][1] == ["experts.b.bias", "experts.b.weight"] + inactive
    assert outcomes[1][0][1] == ["experts.a.bias", "experts.a.weight"] + inactive


@pytest.mark.slow
def test_parameter_unused_on_every_rank_raises_the_same_error_on_every_rank_at_the_first_step(every_scenario):
    outcomes = run_two_ranks(every_scenario, "unused_everywhere")
    expected = [["error", [["aux.bias", "aux", "unused"], ["aux.weight", "aux", "unused"]]]]
    assert outcomes[0] == outcomes[1] == expected


@pytest.mark.slow
def test_cause_comes_from_the_rank_that_ran_the_branch_not_from_one_that_routed_it_out(every_scenario):
    outcomes = run_two_ranks(every_scenario, "detached_where_routed")
    expected = [
        ["error", [["experts.b.fc.bias", "experts.b", "detached"], ["experts.b.fc.weight", "experts.b", "detached"]]]
    ]
    assert outcomes[0] == outcomes[1] == expected
