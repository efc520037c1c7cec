"""trainer=expert_parallel: the preset composes, and a two-process gloo run of the script trains and checkpoints."""

import subprocess

import pytest
import torch

from tests.processes import TRAIN
from tests.scripts.train_helpers import ROOT, compose_train

FOURTH_EXPERT = [  # the conditional composite has three experts; two ranks need an even number
    "model.stages.experts.router.out_features=4",
    "+model.stages.experts.branches.e3._target_=composites.presets.models.MLP",
    "+model.stages.experts.branches.e3.in_features=64",
    "+model.stages.experts.branches.e3.out_features=64",
    "+model.stages.experts.branches.e3.hidden=[128]",
]


def test_the_preset_is_the_expert_parallel_strategy_over_every_rank(tmp_path):
    cfg = compose_train(tmp_path, ["+composite=conditional", "trainer=expert_parallel"])
    assert cfg.trainer.strategy._target_ == "composites.training.ExpertParallelStrategy"
    assert cfg.trainer.strategy.expert_parallel_size is None
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("auto", "auto")


@pytest.mark.slow
def test_two_process_gloo_run_spreads_the_experts_trains_and_saves_the_full_model(tmp_path):
    limits = ["trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]
    ranks = ["trainer=expert_parallel", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=1"]
    command = [*TRAIN, "+composite=conditional", *ranks, *FOURTH_EXPERT, *limits, f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = (
        "expert parallel: 'model.experts' (4 experts, 2 per rank); expert-parallel group of 2 ranks, "
        "1 data-parallel copy of each expert, 2 ranks in all"
    )
    assert done.stdout.count(expected) == 1  # one line, from rank zero
    assert done.stdout.count("test/acc") == 1
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    experts = {key.split(".")[2] for key in checkpoint["state_dict"] if key.startswith("model.experts.e")}
    assert experts == {"e0", "e1", "e2", "e3"}  # every expert, from both ranks: the single-process model
    saved = checkpoint["optimizer_states"][0]["expert_parallel"]
    assert (saved["world_size"], saved["expert_parallel_size"], len(saved["ranks"])) == (2, 2, 2)
