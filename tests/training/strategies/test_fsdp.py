"""FSDP2 through Lightning on two gloo ranks: sharded per sub-model, guarded, resumable, never hanging."""

import pytest
import torch
from torch import nn

from composites import Conditional, Parallel, Sequential
from composites.training import FSDP2Strategy
from composites.training.strategies.prepare import configure_sharding
from composites.training.strategies.sharding import composite_units, full_checkpoint, units_matching
from tests import gloo_ranks

# the session's one spawn of gloo ranks runs them, in this order (tests.gloo_ranks); each fails only its own tests
SCENARIOS = ("healthy", "resume", "one_rank", "detached", "accumulation", "non_finite")  # resume reads healthy's run
for _scenario in SCENARIOS:
    # the first without a process group: Lightning's FSDP2Strategy starts it, as in a job torchrun or SLURM started
    first = _scenario == SCENARIOS[0]
    gloo_ranks.scenario(
        f"fsdp-{_scenario}", 2, "tests.training.strategies.fsdp_workers:run", _scenario, folder="fsdp", group=not first
    )


def both(scenario: str) -> tuple[dict, dict]:
    rank0, rank1 = gloo_ranks.outcome(f"fsdp-{scenario}")
    return rank0, rank1


@pytest.mark.slow
@gloo_ranks.SHARED
def test_healthy_composite_trains_guarded_with_whole_gradient_norms_and_a_sharded_checkpoint():
    rank0, rank1 = both("healthy")
    assert rank0.pop("said") == ["FSDP2: 6 units (encoder, middle, middle.a, middle.b, head, then the root)"]
    assert rank1.pop("said") == []  # rank zero's log
    assert rank0 == rank1
    assert rank0["ok"] and rank0["checked"] == 8 and rank0["step"] == 2
    assert rank0["grad_norms"] == ["encoder", "head", "middle.a", "middle.b"] and rank0["whole_norms"]
    assert rank0["sharded_checkpoint"]


@pytest.mark.slow
@gloo_ranks.SHARED
def test_ckpt_path_auto_resumes_from_the_sharded_checkpoint_with_the_saved_weights():
    rank0, rank1 = both("resume")
    assert rank0 == rank1 == {"ckpt_path": "last", "step": 4, "restored": True}


@pytest.mark.slow
@gloo_ranks.SHARED
def test_a_sharded_checkpoint_reads_back_whole_in_one_process():
    both("resume")
    checkpoint = full_checkpoint(gloo_ranks.folder("fsdp-healthy") / "healthy" / "checkpoints" / "last.ckpt")
    shapes = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    assert shapes == {
        **{"model.encoder.weight": (8, 4), "model.encoder.bias": (8,)},
        **{f"model.middle.{b}.weight": (4, 8) for b in "ab"},
        **{f"model.middle.{b}.bias": (4,) for b in "ab"},
        **{"model.head.weight": (3, 8), "model.head.bias": (3,)},
    }
    assert checkpoint["global_step"] == 4 and len(checkpoint["optimizer_states"]) == 1


@pytest.mark.slow
@gloo_ranks.SHARED
def test_branch_used_on_one_rank_only_trains_and_the_unused_one_is_listed():
    rank0, rank1 = both("one_rank")
    (said,) = rank0["said"]
    assert said.startswith(
        "FSDP2: 4 units (encoder, experts, head, then the root); set_reduce_scatter_unused_params(True)"
    )
    assert "because the Conditional 'experts' can leave parameters unused on a rank" in said
    inactive = ["experts.c.bias", "experts.c.weight"]
    assert rank0["ok"] and rank1["ok"] and rank0["step"] == rank1["step"] == 2
    assert rank0["inactive"] == ["experts.b.bias", "experts.b.weight", *inactive]
    assert rank1["inactive"] == ["experts.a.bias", "experts.a.weight", *inactive]


@pytest.mark.slow
@gloo_ranks.SHARED
def test_detached_sub_model_raises_the_same_error_with_its_cause_on_both_ranks():
    rank0, rank1 = both("detached")
    expected = [["middle.fc.bias", "middle", "detached"], ["middle.fc.weight", "middle", "detached"]]
    assert rank0 == rank1 == {"error": expected}


@pytest.mark.slow
@gloo_ranks.SHARED
def test_a_cut_in_the_second_micro_batch_without_gradient_sync_is_reported_for_that_micro_batch():
    rank0, rank1 = both("accumulation")
    cut = [["middle.fc.bias", "middle"], ["middle.fc.weight", "middle"]]  # and the encoder, which feeds it
    expected = [[*p, "detached"] for p in [["encoder.bias", "encoder"], ["encoder.weight", "encoder"], *cut]]
    assert rank0 == rank1 == {"checks": ["ok", expected]}


@pytest.mark.slow
@gloo_ranks.SHARED
def test_non_finite_data_on_one_rank_is_read_from_the_shards_and_reported_on_both():
    rank0, rank1 = both("non_finite")
    assert rank0 == rank1
    (problems,) = rank0["checks"]
    names = ["encoder.weight", "head.weight", "middle.fc.weight"]  # the NaN is in the data: biases stay finite
    assert [p[0] for p in problems] == names and {p[2] for p in problems} == {"non_finite"}


def test_default_policy_makes_a_unit_per_sub_model_and_keeps_a_conditional_whole():
    model = Sequential(
        {
            "encoder": nn.Linear(2, 4),
            "mix": Parallel({"a": nn.Linear(4, 2), "b": nn.Sequential(nn.Linear(2, 2))}),
            "moe": Conditional({"x": nn.Sequential(nn.Linear(2, 2)), "y": nn.Linear(2, 2)}, router=lambda h: "x"),
        }
    )
    assert composite_units(model) == [["encoder"], ["mix"], ["mix.a"], ["mix.b"], ["moe"]]  # routed: one unit
    assert composite_units(model, may_skip=["mix.b.*"]) == [
        ["encoder"],
        ["mix"],
        ["mix.a"],
        ["moe"],
    ]
    assert units_matching(["mix.*"])(model) == [["mix.a"], ["mix.b"], ["mix.b.0"]]  # "*" crosses dots


def test_fsdp_preset_composes_into_the_fsdp2_strategy_with_bf16_mixed_precision(tmp_path):
    from hydra.utils import instantiate

    from tests.scripts.train_helpers import compose_train

    cfg = compose_train(tmp_path, ["+composite=conditional", "trainer=fsdp", "trainer.accelerator=cpu"])
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, FSDP2Strategy) and strategy.policy is None
    assert (strategy.mp_policy.param_dtype, strategy.mp_policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_fsdp_strategy_reads_mixed_precision_and_names_a_bad_dtype():
    strategy = FSDP2Strategy(param_dtype="bf16", policy=("encoder",))
    assert (str(strategy.mp_policy.param_dtype), strategy.policy) == ("torch.bfloat16", ["encoder"])
    with pytest.raises(ValueError, match=r"trainer.strategy.param_dtype='bf61': use one of bf16"):
        FSDP2Strategy(param_dtype="bf61")
    assert configure_sharding(object(), nn.Linear(2, 2)) is None
