"""Common Hydra slips (_partial_, _target_) get a hint; settings that would silently waste or mislead a run warn or stop."""

from __future__ import annotations

import os

import pytest

from composites_hydra import ConfigError, build
from composites_hydra.checks import check_config
from composites_hydra.run_settings import metric_direction
from tests.scripts.train_helpers import compose_train


def refusal(tmp_path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        build(compose_train(tmp_path, ["+composite=sequential", *overrides]))
    return str(info.value)


@pytest.mark.parametrize(
    "overrides, line",
    [
        (
            ["+scheduler={_target_: torch.optim.lr_scheduler.CosineAnnealingLR, T_max: 10}"],
            "scheduler: add _partial_: true (scheduler._partial_=true): CompositeModule calls "
            "torch.optim.lr_scheduler.CosineAnnealingLR with the optimizer it builds; without it Hydra calls it now, "
            "without them",
        ),
        (
            ["+scheduler={scheduler: {_target_: torch.optim.lr_scheduler.StepLR, step_size: 2}, interval: step}"],
            "scheduler.scheduler: add _partial_: true (scheduler.scheduler._partial_=true): CompositeModule calls "
            "torch.optim.lr_scheduler.StepLR with the optimizer it builds; without it Hydra calls it now, without them",
        ),
        (
            ["~optimizer._partial_"],
            "optimizer: add _partial_: true (optimizer._partial_=true): CompositeModule calls torch.optim.Adam with "
            "the parameter groups it builds; without it Hydra calls it now, without them",
        ),
        (
            ["model.stages.head._target_=composites.presets.models.MPL"],
            "model.stages.head._target_=composites.presets.models.MPL cannot be imported: composites.presets.models "
            "has no 'MPL'; did you mean composites.presets.models.MLP?",
        ),
        (
            ["model.stages.encoder._target_=composites.preset.models.ConvEncoder"],
            "model.stages.encoder._target_=composites.preset.models.ConvEncoder cannot be imported: composites has no "
            "'preset'; did you mean composites.presets?",
        ),
        (
            ["optimizer._target_=torch.optim.Adamw"],
            "optimizer._target_=torch.optim.Adamw cannot be imported: torch.optim has no 'Adamw'; did you mean "
            "torch.optim.AdamW or torch.optim.Adam or torch.optim.RAdam?",
        ),
        (
            ["~model._target_"],
            "model: no _target_ (got a mapping with keys stages): "
            "this node builds an object, so it names its class, e.g. model._target_=composites.Sequential",
        ),
        (
            ["+callbacks.early={monitor: val/loss}"],
            "callbacks.early: no _target_: a callback node names its class (or is null to drop it)",
        ),
    ],
    ids=[
        "scheduler-partial",
        "scheduler-mapping-partial",
        "optimizer-partial",
        "class-typo",
        "module-typo",
        "near-names",
        "no-target",
        "callback-no-target",
    ],
)
def test_a_hydra_slip_gets_the_fix(tmp_path, overrides, line):
    assert refusal(tmp_path, *overrides).splitlines() == ["a config value does not fit:", f"  {line}"]


@pytest.mark.parametrize(
    "monitor, mode, direction",
    [
        ("val/loss", "max", "min"),
        ("val/acc", "min", "max"),
        ("train/loss_epoch", "max", "min"),
        ("val/f1", "min", "max"),
    ],
)
def test_a_monitor_mode_against_the_metric_direction_is_refused_with_the_fix(tmp_path, monitor, mode, direction):
    message = refusal(tmp_path, f"monitor={monitor}", f"monitor_mode={mode}")
    assert message == (
        f"monitor_mode={mode} contradicts monitor={monitor}: "
        + ("a loss or error is best low" if direction == "min" else "a score is best high")
        + f", so mode {mode} would keep and test the worst checkpoint. Drop monitor_mode (null follows the metric: "
        f"{direction}) or set monitor_mode={direction}. If {monitor} really is best "
        + ("high" if mode == "max" else "low")
        + f", set the checkpoint's own mode instead: callbacks.checkpoint.mode={mode}"
    )


def test_the_checkpoints_own_mode_is_the_explicit_override(tmp_path):
    _, _, trainer = build(
        compose_train(tmp_path, ["+composite=sequential", "monitor=val/loss", "callbacks.checkpoint.mode=max"])
    )
    assert (trainer.checkpoint_callback.monitor, trainer.checkpoint_callback.mode) == ("val/loss", "max")


def test_metric_direction_reads_the_words_of_the_name():
    assert [
        metric_direction(n) for n in ("val/loss", "val/acc", "val/mse", "val/auroc", "val/score", "val/loss_f1")
    ] == [
        "min",
        "max",
        "min",
        "max",
        None,
        None,
    ]


@pytest.mark.parametrize("strategy", ["auto", "ddp_spawn", "{_target_: composites.training.FSDP2Strategy}"])
def test_more_cpu_processes_than_cores_warns_for_any_strategy(tmp_path, strategy):
    cores = os.cpu_count() or 1
    cfg = compose_train(
        tmp_path,
        [
            "+composite=sequential",
            "trainer.accelerator=cpu",
            f"trainer.devices={cores + 1}",
            f"trainer.strategy={strategy}",
        ],
    )
    shown = "composites.training.FSDP2Strategy" if strategy.startswith("{") else strategy
    with pytest.warns(UserWarning) as record:
        check_config(cfg)
    assert [str(w.message) for w in record] == [
        f"trainer.devices={cores + 1} starts {cores + 1} CPU processes (strategy {shown}) on {cores} cores: they share "
        f"the cores, so each step runs slower than with {cores} processes; use trainer.devices<={cores}"
    ]


@pytest.mark.parametrize(
    "overrides, warning",
    [
        (
            ["trainer.max_epochs=0"],
            "trainer.max_epochs=0 trains nothing: fit returns at once and the test runs on the untrained (or resumed) "
            "weights; set trainer.max_epochs>=1",
        ),
        (
            ["trainer.limit_val_batches=0"],
            "trainer.limit_val_batches=0 turns validation off: monitor=val/acc is never logged, so no best checkpoint "
            "is kept and the test runs on the last weights; validate at least once, or monitor a train/ metric",
        ),
        (
            ["trainer.check_val_every_n_epoch=20"],
            "trainer.check_val_every_n_epoch=20 is more than trainer.max_epochs=10, so no validation runs: "
            "monitor=val/acc is never logged, so no best checkpoint is kept and the test runs on the last weights; "
            "validate at least once, or monitor a train/ metric",
        ),
        (
            ["callbacks.checkpoint.save_top_k=0"],
            "callbacks.checkpoint.save_top_k=0 keeps no best checkpoint: the test runs on the last epoch's weights, "
            "not the best; set save_top_k>=1, or drop the callback (~callbacks.checkpoint) to say so",
        ),
    ],
    ids=["no-epochs", "no-validation", "validation-after-the-end", "no-best"],
)
def test_a_run_that_would_train_or_select_nothing_warns(tmp_path, overrides, warning):
    with pytest.warns(UserWarning) as record:
        check_config(compose_train(tmp_path, ["+composite=sequential", *overrides]))
    assert [str(w.message) for w in record] == [warning]


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_numpy_cannot_take_is_named_before_anything_is_seeded(tmp_path, seed):
    from composites_hydra import ConfigError
    from tests.scripts.train_helpers import train

    with pytest.raises(ConfigError, match=rf"seed={seed}: use a whole number from 0 to 4294967295"):
        train.train(compose_train(tmp_path, ["+composite=sequential", f"seed={seed}"]))
