"""Every mistake of issue 14 is named (key or argument, and the fix) before training starts; silent ones warn."""

from __future__ import annotations

import os
from functools import partial

import pytest
import torch
from torch import nn

from composites import CompositeModule, Parallel, Sequential, StageError
from composites.presets.models import MLP, ConvEncoder
from composites_hydra import ConfigError, build
from composites_hydra.checks import check_config
from tests.scripts.train_helpers import compose_train


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["monitor=val/accuracy"],
            r"monitor=val/accuracy: the module logs no such metric \(it logs .*val/acc, val/loss",
        ),
        (["trainer.accumulate_grad_batches=0"], r"trainer.accumulate_grad_batches=0: it must be a positive integer"),
        (["scheduler=CosineAnnealingLR"], r"scheduler=CosineAnnealingLR: a scheduler is a config node with a _target_"),
        (
            ["module.metrics.metrics.acc.num_classes=12"],
            r"acc has num_classes=12 but the model's last layer gives 10 outputs; set num_classes: 10",
        ),
        (
            ["+model.stages.act._target_=torch.nn.functional.relu"],
            r"model.stages.act._target_=torch.nn.functional.relu is a function, not a class: it returns a Tensor where a Module is wanted. Use a class \(torch.nn.ReLU",
        ),
    ],
    ids=["monitor", "accumulate", "scheduler-name", "num-classes", "function-stage"],
)
def test_a_config_mistake_is_named_with_its_fix_before_anything_trains(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build(compose_train(tmp_path, ["+composite=sequential", *overrides]))


def test_a_split_too_small_for_every_class_names_the_fractions(tmp_path):
    datamodule, _, _ = build(compose_train(tmp_path, ["+composite=sequential", "data.val_fraction=0.001"]))
    with pytest.raises(ValueError, match=r"raise data.val_fraction / data.test_fraction to at least 0.011"):
        datamodule.setup("fit")  # what fit does first, before any step


def test_load_balancing_is_a_key_of_every_preset_and_warns_where_it_does_nothing(tmp_path):
    with pytest.warns(UserWarning, match=r"module.load_balancing=0.1 has no effect: the model has no Conditional"):
        build(compose_train(tmp_path, ["+composite=sequential", "module.load_balancing=0.1"]))


def test_a_zero_learning_rate_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"optimizer.lr=0: the optimizer will not change any weight"):
        build(compose_train(tmp_path, ["+composite=sequential", "optimizer.lr=0"]))


def test_an_empty_mapping_override_that_merges_into_nothing_warns(tmp_path):
    override = "model.stages.fuse.branches={}"
    cfg = compose_train(tmp_path, ["+composite=parallel", override])
    with pytest.warns(UserWarning, match=r"model.stages.fuse.branches=\{\} has no effect.*~model.stages.fuse.branches"):
        check_config(cfg, [override])


def test_cpu_ddp_with_more_processes_than_cores_warns(tmp_path):
    devices = (os.cpu_count() or 1) + 1
    cfg = compose_train(
        tmp_path, ["+composite=sequential", "trainer=ddp", "trainer.accelerator=cpu", f"trainer.devices={devices}"]
    )
    with pytest.warns(
        UserWarning,
        match=rf"trainer.devices={devices} starts {devices} CPU processes \(strategy ddp\) on {devices - 1} cores",
    ):
        check_config(cfg)


def test_a_parallel_given_a_mapping_not_keyed_by_its_branches_says_so_when_a_branch_fails():
    model = Parallel({"cnn": ConvEncoder(out_features=4), "mlp": MLP(64, 4)})
    with pytest.raises(StageError) as info:
        model({"image": torch.zeros(2, 1, 8, 8), "flat": torch.zeros(2, 64)})
    assert "keys (image, flat) are not the branch names (cnn, mlp)" in "\n".join(info.value.__notes__)


def test_input_entries_a_parallel_ignores_warn_once():
    model = Parallel({"a": nn.Identity(), "b": nn.Identity()})
    x = {"a": torch.zeros(1, 2), "b": torch.zeros(1, 2), "c": torch.zeros(1, 2)}
    with pytest.warns(
        UserWarning, match=r"Parallel ignores input entries c: no branch has that name \(branches: a, b\)"
    ):
        model(x)


def module(model: nn.Module, optimizer=None) -> CompositeModule:
    return CompositeModule(model, nn.CrossEntropyLoss(), optimizer or partial(torch.optim.Adam, lr=1e-3))


def test_an_optimizer_instance_instead_of_a_partial_is_named():
    model = Sequential({"head": nn.Linear(4, 3)})
    with pytest.raises(TypeError, match=r"got an Adam instance; it needs a partial .*_partial_: true"):
        module(model, torch.optim.Adam(model.parameters()))


def test_a_model_with_every_parameter_frozen_is_named():
    model = Sequential({"head": nn.Linear(4, 3)}).requires_grad_(False)
    with pytest.raises(ValueError, match=r"every parameter of the model is frozen \(requires_grad=False\)"):
        module(model).configure_optimizers()


def test_a_batch_that_is_not_input_and_target_is_named():
    with pytest.raises(TypeError, match=r"expects each batch as \(input, target\), got a dict with keys x, y"):
        module(Sequential({"head": nn.Linear(4, 3)})).training_step({"x": torch.zeros(2, 4), "y": torch.zeros(2)}, 0)


@pytest.mark.parametrize(
    "argument, message",
    [
        ({"batch_size": 0}, "batch_size=0 must be a positive int (data.batch_size)"),
        ({"num_workers": -1}, "num_workers=-1 must be an int >= 0 (data.num_workers; 0: load in this process)"),
    ],
)
def test_a_batch_size_or_worker_count_that_cannot_load_is_named_when_the_data_is_built(argument, message):
    from composites.presets import DigitsDataModule

    with pytest.raises(ValueError) as info:
        DigitsDataModule(**argument)
    assert str(info.value) == message
