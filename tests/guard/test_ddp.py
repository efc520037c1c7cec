"""The guard under two-rank gloo DDP: one verdict on every rank, never a rank raising alone.

Each scenario runs on the session's one spawn of gloo ranks (``tests.gloo_ranks``), in a process
group of its own; a scenario that breaks fails only its own test.
"""

import pytest

from tests import gloo_ranks

ONE_RANK, UNUSED_EVERYWHERE, DETACHED_WHERE_ROUTED = (
    gloo_ranks.scenario(f"guard-ddp-{name}", 2, "tests.guard.ddp_workers:verdicts", name)
    for name in ("one_rank", "unused_everywhere", "detached_where_routed")
)


@pytest.mark.slow
@gloo_ranks.SHARED
def test_branch_active_on_one_rank_only_passes_and_routed_out_branch_is_listed():
    outcomes = gloo_ranks.outcome(ONE_RANK)
    # 'a' runs on rank 0, 'b' on rank 1, so both are reached somewhere; 'c' runs nowhere
    inactive = ["experts.c.bias", "experts.c.weight"]
    for rank in (0, 1):
        assert [status for status, _ in outcomes[rank]] == ["ok"] * 3
    assert outcomes[0][0][1] == ["experts.b.bias", "experts.b.weight"] + inactive
    assert outcomes[1][0][1] == ["experts.a.bias", "experts.a.weight"] + inactive


@pytest.mark.slow
@gloo_ranks.SHARED
def test_parameter_unused_on_every_rank_raises_the_same_error_on_every_rank_at_the_first_step():
    outcomes = gloo_ranks.outcome(UNUSED_EVERYWHERE)
    expected = [["error", [["aux.bias", "aux", "unused"], ["aux.weight", "aux", "unused"]]]]
    assert outcomes[0] == outcomes[1] == expected


@pytest.mark.slow
@gloo_ranks.SHARED
def test_cause_comes_from_the_rank_that_ran_the_branch_not_from_one_that_routed_it_out():
    outcomes = gloo_ranks.outcome(DETACHED_WHERE_ROUTED)
    expected = [
        ["error", [["experts.b.fc.bias", "experts.b", "detached"], ["experts.b.fc.weight", "experts.b", "detached"]]]
    ]
    assert outcomes[0] == outcomes[1] == expected
