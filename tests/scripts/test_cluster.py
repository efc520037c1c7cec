"""Scale-out presets: DDP on CPU through gloo with a Conditional, FSDP1 pointed to FSDP2, SLURM configs."""

import subprocess

import pytest
from pytorch_lightning.strategies import DDPStrategy, FSDPStrategy
from torch import nn

from composites import Conditional, Sequential
from composites.training.strategies.prepare import prepare_strategy
from composites_hydra import resume_path
from composites_hydra.build import CONFIG_DIR
from tests.processes import TRAIN, repository_env
from tests.scripts.train_helpers import ROOT, compose_train

# One epoch of scripts/train.py on two gloo ranks on this machine's CPU, quietly.
TWO_CPU_RANKS = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
]


def test_ddp_without_routing_is_left_alone_and_fsdp1_with_the_guard_points_to_fsdp2():
    plain = DDPStrategy()
    assert prepare_strategy(plain, Sequential({"a": nn.Linear(2, 2)}), guard_on=True) is None
    assert "find_unused_parameters" not in plain._ddp_kwargs
    with pytest.raises(RuntimeError, match=r"FSDP1 \(FSDPStrategy\) flattens.*use trainer=fsdp.*guard=off"):
        prepare_strategy(FSDPStrategy(), Sequential({"a": nn.Linear(2, 2)}), guard_on=True)
    assert prepare_strategy(FSDPStrategy(), Sequential({"a": nn.Linear(2, 2)}), guard_on=False) is None
    routed = Sequential({"moe": Conditional({"a": nn.Identity(), "b": nn.Identity()}, router=None)})
    explicit = DDPStrategy(find_unused_parameters=True)
    assert prepare_strategy(explicit, routed, guard_on=True) is None  # already what it needs


def test_trainer_presets_compose(tmp_path):
    for preset, expected in {
        "cpu": ("cpu", 1, None),
        "gpu": ("gpu", 1, "bf16-mixed"),
        "ddp": ("auto", "auto", None),
    }.items():
        cfg = compose_train(tmp_path, ["+composite=sequential", f"trainer={preset}"])
        assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.get("precision")) == expected
    assert compose_train(tmp_path, ["+composite=sequential", "trainer=ddp"]).trainer.strategy == "ddp"


def test_slurm_launcher_config_composes_with_the_submitit_plugin(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"paths.output_dir={tmp_path}", "+composite=parallel", "hydra/launcher=slurm"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.max_num_timeout, launcher.signal_delay_s) == (3, 120)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cpu = compose(
            "train",
            overrides=[f"paths.output_dir={tmp_path}", "+composite=parallel", "hydra/launcher=slurm_cpu"],
            return_hydra_config=True,
        ).hydra.launcher
    assert (cpu.gpus_per_node, cpu.cpus_per_task, cpu.mem_gb, cpu.max_num_timeout) == (0, 1, 2, 3)  # slurm.yaml's rest


def test_auto_resume_picks_what_the_run_directory_holds(tmp_path):
    assert resume_path("auto", str(tmp_path)) is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert resume_path("auto", str(tmp_path)) == "last"
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"")
    assert resume_path("auto", str(tmp_path)) is None  # Lightning resumes its own HPC checkpoint
    assert resume_path("some.ckpt", str(tmp_path)) == "some.ckpt"


@pytest.mark.slow
def test_two_process_gloo_ddp_run_of_the_script_with_a_conditional_finishes(tmp_path):
    limits = ["trainer.limit_train_batches=4", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2"]
    command = [*TRAIN, "+composite=conditional", *TWO_CPU_RANKS, *limits, f"hydra.run.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    assert "DDP: find_unused_parameters=True, because the Conditional 'experts'" in out
    assert done.stdout.count("test/acc") == 1  # one table, from rank zero
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_under_two_process_ddp_a_detached_encoder_stops_every_rank_with_the_same_table(tmp_path):
    detached = "model.stages.encoder._target_=tests.scripts.broken_models.DetachedConvEncoder"
    command = [*TRAIN, "+composite=sequential", *TWO_CPU_RANKS, detached, f"hydra.run.dir={tmp_path}"]
    env = repository_env()
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)  # fails, never hangs
    out = done.stdout + done.stderr
    assert done.returncode != 0
    tables = [
        part.split("\nfix detached")[0] for part in out.split("composites.guard.problems.GradientFlowError: ")[1:]
    ]
    assert len(tables) == 2, out[-3000:]  # rank 0 and rank 1 both raised ...
    assert tables[0] == tables[1]  # ... the same table
    rows = [line.split() for line in tables[0].splitlines()[2:]]
    assert {(r[0], r[1], r[2]) for r in rows} == {
        (f"encoder.{layer}.{w}", "encoder", "detached")
        for layer in ("features.0", "features.2", "project.0")
        for w in ("weight", "bias")
    }
