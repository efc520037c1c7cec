"""Expert parallelism on gloo: the single-process model's numbers, and one guard verdict on every rank."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn

from composites import Conditional, Sequential
from composites.parallelism import ExpertGroups, shard_experts
from tests import gloo_ranks

TOLERANCE = 1e-5
WORKERS = "tests.parallelism.ep_workers"
# the session's one spawn of gloo ranks runs these (tests.gloo_ranks); each fails only its own tests
NUMERICS_TWO = gloo_ranks.scenario("expert-parallel-numerics-2", 2, f"{WORKERS}:numerics")
NUMERICS_FOUR = gloo_ranks.scenario("expert-parallel-numerics-4", 4, f"{WORKERS}:numerics_four")
GUARD = gloo_ranks.scenario("expert-parallel-guard", 2, f"{WORKERS}:guard")
CHECKPOINT = gloo_ranks.scenario("expert-parallel-checkpoint", 2, f"{WORKERS}:checkpoint")


NUMERIC_CASES = [f"top{k}-cf{cf}-adam" for k in (1, 2) for cf in (None, 1.0, 0.5)] + ["top1-cfNone-sgd", "composed"]


@pytest.mark.slow
@gloo_ranks.SHARED
@pytest.mark.parametrize("case", NUMERIC_CASES)
def test_two_ranks_give_the_single_process_loss_gate_gradient_and_parameters_after_a_step(case):
    two_ranks = gloo_ranks.outcome(NUMERICS_TWO)
    for rank in (0, 1):
        result = two_ranks[rank][case]
        assert result["same_keys"], "the gathered full state has the single-process model's keys"
        assert result["loss"] < TOLERANCE
        assert result["gate_grad"] < TOLERANCE
        assert result["params"] < TOLERANCE
        dropped, expected = result["dropped"]
        assert dropped == expected  # capacity drops the very pairs the single-process model drops


@pytest.mark.slow
@gloo_ranks.SHARED
def test_two_conditionals_one_in_a_parallel_with_a_conditional_nested_in_an_expert_are_spread_outermost_only():
    two_ranks = gloo_ranks.outcome(NUMERICS_TWO)
    assert two_ranks[0]["composed"]["spread"] == ["both.moe", "capped"]  # the nested one stays whole on e0's rank
    assert two_ranks[0]["composed"]["dropped"] == [4, 4]


@pytest.mark.slow
@gloo_ranks.SHARED
def test_a_checkpoint_resumes_exactly_holds_the_single_process_model_and_refuses_another_size():
    for result in gloo_ranks.outcome(CHECKPOINT):
        assert result["resumed_equal"] and result["same_local_keys"] and result["saved_keys"]
        assert (
            "saved on 2 ranks with expert_parallel_size=1, this run has 2 ranks with expert_parallel_size=2"
            in (result["refused"])
        )
        assert (
            "resume with the same trainer.devices * trainer.num_nodes and trainer.strategy.expert_parallel_size"
            in (result["refused"])
        )


@pytest.mark.slow
@gloo_ranks.SHARED
def test_capacity_cases_do_drop_pairs_so_the_drop_rule_is_tested():
    two_ranks = gloo_ranks.outcome(NUMERICS_TWO)
    assert [two_ranks[0][f"top{k}-cf{cf}-adam"]["dropped"][1] for k in (1, 2) for cf in (1.0, 0.5)] == [6, 8, 12, 13]


@pytest.mark.slow
@gloo_ranks.SHARED
def test_each_rank_holds_its_own_half_of_the_experts():
    two_ranks = gloo_ranks.outcome(NUMERICS_TWO)
    assert two_ranks[0]["top1-cfNone-adam"]["local_experts"] == ["e0", "e1"]
    assert two_ranks[1]["top1-cfNone-adam"]["local_experts"] == ["e2", "e3"]


@pytest.mark.slow
@gloo_ranks.SHARED
def test_four_ranks_with_and_without_copies_of_the_expert_shards_give_the_single_process_numbers():
    four_ranks = gloo_ranks.outcome(NUMERICS_FOUR)
    for rank in range(4):
        for case, result in four_ranks[rank].items():
            assert result["same_keys"] and result["dropped"][0] == result["dropped"][1], case
            assert max(result["loss"], result["gate_grad"], result["params"]) < TOLERANCE, case
        assert four_ranks[rank]["top1-cfNone-adam"]["local_experts"] == [f"e{rank}"]
        assert four_ranks[rank]["ep2-top2-cfNone-adam"]["local_experts"] == [["e0", "e1"], ["e2", "e3"]][rank % 2]


@pytest.mark.slow
@gloo_ranks.SHARED
def test_guard_passes_healthy_expert_parallel_steps_on_every_rank():
    two_ranks = gloo_ranks.outcome(GUARD)
    assert two_ranks[0]["healthy"] == two_ranks[1]["healthy"] == [["ok", []], ["ok", []]]


@pytest.mark.slow
@gloo_ranks.SHARED
def test_experts_without_samples_anywhere_are_inactive_on_their_owner_then_starve_with_one_table_everywhere():
    two_ranks = gloo_ranks.outcome(GUARD)
    weights = lambda e: [f"moe.{e}.{layer}.{kind}" for layer in (0, 2) for kind in ("bias", "weight")]  # noqa: E731
    # step 1: no hang, nothing raised; each owner lists its idle experts (e0 took every sample)
    assert two_ranks[0]["dead"][0] == ["ok", weights("e1")]
    assert two_ranks[1]["dead"][0] == ["ok", weights("e2") + weights("e3")]
    # step 2 (starved_after=2): the same table on both ranks, each expert named with its owner
    status, problems = two_ranks[0]["dead"][1]
    assert two_ranks[1]["dead"][1] == [status, problems] and status == "error"
    owner = {"e1": 0, "e2": 1, "e3": 1}
    assert [p[:3] for p in problems] == [[n, f"moe.{e}", "starved"] for e in ("e1", "e2", "e3") for n in weights(e)]
    assert all(p[3].endswith(f"(on rank {owner[p[1][4:]]})") for p in problems)


@pytest.mark.slow
@gloo_ranks.SHARED
def test_cut_inside_an_expert_is_named_with_its_owning_rank_on_every_rank():
    two_ranks = gloo_ranks.outcome(GUARD)
    where = "inside 'moe.e3'.forward, after 'moe.e3.fc' (on rank 1)"
    expected = [["error", [[f"moe.e3.fc.{k}", "moe.e3", "detached", where] for k in ("bias", "weight")]]]
    assert two_ranks[0]["cut"] == two_ranks[1]["cut"] == expected


@pytest.mark.slow
@gloo_ranks.SHARED
def test_capacity_mode_runs_every_expert_so_none_is_inactive():
    two_ranks = gloo_ranks.outcome(GUARD)
    assert two_ranks[0]["capacity_dead"] == two_ranks[1]["capacity_dead"] == [["ok", []]]


# ------------------------------------------------------------------ one process: set-up errors, no spawn
@pytest.fixture
def world_of_one() -> Iterator[None]:
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def moe(experts: int = 3) -> Sequential:
    return Sequential(
        {"moe": Conditional({f"e{i}": nn.Linear(2, 2) for i in range(experts)}, router=nn.Linear(2, experts))}
    )


def test_an_expert_parallel_size_that_does_not_divide_the_world_is_refused_naming_the_key(world_of_one):
    with pytest.raises(ValueError, match=r"expert_parallel_size=2 must .* dividing the world size 1 \(one of \[1\]\)"):
        shard_experts(moe(), ep_size=2)


def test_a_model_without_a_gated_conditional_is_refused_pointing_to_ddp(world_of_one):
    named = Sequential({"c": Conditional({"a": nn.Linear(2, 2)}, router=lambda x: "a")})
    with pytest.raises(ValueError, match="no Conditional routed per sample by a gate module .* use trainer=ddp"):
        shard_experts(named)


def test_on_one_rank_every_expert_stays_and_the_output_is_the_single_process_one(world_of_one):
    torch.manual_seed(0)
    reference = moe(4)
    torch.manual_seed(0)
    model = moe(4)
    ep = shard_experts(model)
    x = torch.randn(5, 2)
    assert torch.equal(model(x), reference(x))
    assert sorted(ep.expert_parameter_names) == sorted(n for n, _ in reference.named_parameters() if ".e" in n)


def test_experts_that_do_not_split_evenly_over_the_group_are_refused_naming_the_sizes_that_would():
    pair = ExpertGroups(
        world_size=2, ep_size=2, ep_rank=0, ep_group=None, replica_size=1, replica_group=None, world_group=None
    )
    with pytest.raises(
        ValueError,
        match=r"'moe' has 3 experts, which do not split evenly over expert_parallel_size=2 ranks; set expert_parallel_size to one of \[1\]",
    ):
        shard_experts(moe(3), groups=pair)


def test_a_spread_conditional_whose_gate_names_one_branch_for_the_batch_says_it_needs_scores(world_of_one):
    class NamesA(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "e0"

    model = Sequential({"moe": Conditional({"e0": nn.Linear(2, 2), "e1": nn.Linear(2, 2)}, router=NamesA())})
    shard_experts(model)
    with pytest.raises(RuntimeError, match="branch 'e0' for the whole batch, but the branches are spread over ranks"):
        model(torch.ones(1, 2))


def test_a_model_sharded_with_fsdp2_is_refused_saying_the_two_do_not_compose(world_of_one):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = moe(2)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    with pytest.raises(ValueError, match="does not compose with FSDP2.*trainer=expert_parallel.*trainer=fsdp"):
        shard_experts(model)
