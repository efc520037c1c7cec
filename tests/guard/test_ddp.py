"""The guard under two-rank gloo DDP: one verdict on every rank, never a rank raising alone."""

import json
from pathlib import Path

import pytest

from tests.guard import ddp_workers
from tests.processes import free_port, spawn_until_written

TIMEOUT_S = 180  # a hang fails here; a slow, busy 2-core machine does not


def run_two_ranks(scenario: str, out_dir: Path) -> dict[int, list]:
    """Each rank's verdicts, as soon as both have written them; fails (never hangs) past the deadline."""
    paths = {rank: out_dir / f"rank{rank}.json" for rank in (0, 1)}
    args = (2, free_port(), scenario, str(out_dir))
    if failed := spawn_until_written(ddp_workers.run, args, paths.values(), TIMEOUT_S):
        pytest.fail(f"DDP scenario '{scenario}': {failed}")
    return {rank: json.loads(path.read_text()) for rank, path in paths.items()}


@pytest.mark.slow
def test_branch_active_on_one_rank_only_passes_and_routed_out_branch_is_listed(tmp_path):
    outcomes = run_two_ranks("one_rank", tmp_path)
    # 'a' runs on rank 0, 'b' on rank 1, so both are reached somewhere; 'c' runs nowhere
    inactive = ["experts.c.bias", "experts.c.weight"]
    for rank in (0, 1):
        assert [status for status, _ in outcomes[rank]] == ["ok"] * 3
    assert outcomes[0][0][1] == ["experts.b.bias", "experts.b.weight"] + inactive
    assert outcomes[1][0][1] == ["experts.a.bias", "experts.a.weight"] + inactive


@pytest.mark.slow
def test_parameter_unused_on_every_rank_raises_the_same_error_on_every_rank_at_the_first_step(tmp_path):
    outcomes = run_two_ranks("unused_everywhere", tmp_path)
    expected = [["error", [["aux.bias", "aux", "unused"], ["aux.weight", "aux", "unused"]]]]
    assert outcomes[0] == outcomes[1] == expected


@pytest.mark.slow
def test_cause_comes_from_the_rank_that_ran_the_branch_not_from_one_that_routed_it_out(tmp_path):
    outcomes = run_two_ranks("detached_where_routed", tmp_path)
    expected = [
        ["error", [["experts.b.fc.bias", "experts.b", "detached"], ["experts.b.fc.weight", "experts.b", "detached"]]]
    ]
    assert outcomes[0] == outcomes[1] == expected
