"""Every Hydra config composes and instantiates; bad overrides fail with an error naming the key."""

from __future__ import annotations

import importlib.util
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from train_helpers import ROOT, compose_train, train

from composites import CompositeModule, Conditional, Parallel, Sequential
from composites.data import DigitsDataModule
from composites.models import ConvEncoder

COMPOSITES = ["conditional", "parallel", "sequential"]


def test_the_composite_group_lists_exactly_the_shipped_presets():
    assert train.available_composites() == COMPOSITES
    assert sorted(p.stem for p in (ROOT / "configs" / "composite").glob("*.yaml")) == COMPOSITES


@pytest.mark.parametrize(
    "name, inputs, first_stage",
    [("sequential", "image", ConvEncoder), ("parallel", "views", Parallel), ("conditional", "flat", Conditional)],
)
def test_each_composite_instantiates_a_real_model_for_its_data_view(tmp_path, name, inputs, first_stage):
    cfg = compose_train(tmp_path, [f"+composite={name}"])
    assert cfg.data.inputs == inputs
    datamodule, module, trainer = train.build(cfg)
    assert isinstance(datamodule, DigitsDataModule) and datamodule.inputs == inputs
    assert isinstance(module, CompositeModule) and isinstance(module.model, Sequential)
    assert module.guard_mode == "raise"
    assert isinstance(getattr(module.model, module.model.stage_names[0]), first_stage)
    assert isinstance(trainer, pl.Trainer) and trainer.max_epochs == cfg.trainer.max_epochs
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert module(x).shape == (64, 10) and y.shape == (64,)
    optimizer = module.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam)
    held = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(held) == sorted(id(p) for p in module.model.parameters())


def test_defaults_wire_checkpoints_logging_and_the_run_directory(tmp_path):
    cfg = compose_train(tmp_path, ["+composite=sequential"])
    _, _, trainer = train.build(cfg)
    checkpoint = trainer.checkpoint_callback
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_last) == ("val/acc", "max", True)
    assert checkpoint.dirpath == str(tmp_path / "checkpoints")
    assert isinstance(trainer.logger, pl.loggers.CSVLogger) and trainer.logger.log_dir == str(tmp_path / "logs") + "/"
    assert trainer.default_root_dir == str(tmp_path)


@pytest.mark.parametrize("preset", ["default", "cpu", "gpu", "ddp"])
def test_trainer_presets(tmp_path, preset):
    trainer = compose_train(tmp_path, ["+composite=sequential", f"trainer={preset}"]).trainer
    expected = {
        "default": ("auto", "auto", 1, None),
        "cpu": ("cpu", "auto", 1, None),
        "gpu": ("gpu", "auto", 1, "bf16-mixed"),
        "ddp": ("auto", "ddp", "auto", None),
    }[preset]
    assert (trainer.accelerator, trainer.strategy, trainer.devices, trainer.precision) == expected
    if preset == "ddp":  # instantiable here on CPU processes; nothing is launched before fit
        built = train._build({**trainer, "accelerator": "cpu", "devices": 2}, logger=False)
        assert type(built.strategy).__name__ == "DDPStrategy" and built.num_devices == 2


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_presets_are_partials(tmp_path, name, cls):
    factory = train._build(compose_train(tmp_path, [f"optimizer={name}"]).optimizer)
    assert isinstance(factory, partial)
    assert isinstance(factory([torch.nn.Parameter(torch.zeros(1))]), cls)


def test_logger_presets(tmp_path):
    assert isinstance(train._build(compose_train(tmp_path).logger), pl.loggers.CSVLogger)
    node = compose_train(tmp_path, ["logger=tensorboard"]).logger
    assert node._target_ == "pytorch_lightning.loggers.TensorBoardLogger"
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        assert isinstance(train._build(node), pl.loggers.TensorBoardLogger)
    else:  # optional package: the error says what to install
        with pytest.raises(InstantiationException, match="Neither `tensorboard` nor `tensorboardX` is available"):
            train._build(node)


def test_param_groups_and_guard_mode_reach_the_module(tmp_path):
    cfg = compose_train(tmp_path, ["+composite=parallel", "guard=warn", "module.param_groups=[{prefix: fuse.image, lr: 0.0001}]"])
    _, module, _ = train.build(cfg)
    assert module.guard_mode == "warn" and module.hparams.param_groups == [{"prefix": "fuse.image", "lr": 0.0001}]
    groups = module.configure_optimizers().param_groups
    assert [(g["name"], g["lr"]) for g in groups] == [("fuse.image", 0.0001), ("default", 0.001)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in module.model.fuse.image.parameters()}


def test_a_scheduler_given_on_the_command_line_is_used(tmp_path):
    cosine = "scheduler={_target_: torch.optim.lr_scheduler.CosineAnnealingLR, _partial_: true, T_max: 10}"
    _, module, _ = train.build(compose_train(tmp_path, ["+composite=sequential", cosine]))
    config = module.configure_optimizers()
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)
    assert config["lr_scheduler"]["interval"] == "epoch" and config["lr_scheduler"]["scheduler"].T_max == 10


# ---------------------------------------------------------------- bad command lines
def error_text(error: BaseException) -> str:
    """Hydra wraps the OmegaConf error that names the key; the CLI prints both."""
    return f"{error}\n{error.__cause__}"


def test_no_composite_says_how_to_choose_one(tmp_path):
    cfg = compose_train(tmp_path)
    with pytest.raises(train.NoCompositeError, match=r"add \+composite=NAME, one of: conditional, parallel, sequential"):
        train.build(cfg)


def test_a_bogus_composite_lists_the_options(tmp_path):
    with pytest.raises(MissingConfigException) as info:
        compose_train(tmp_path, ["+composite=bogus"])
    message = str(info.value)
    assert "Could not find 'composite/bogus'" in message
    assert "Available options in 'composite':\n\tconditional\n\tparallel\n\tsequential" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("seedd=1", "Key 'seedd' not in 'TrainConfig'"),
        ("guard=rase", "Invalid value 'rase', expected one of [raise, warn, off]\n    full_key: guard"),
        ("seed=abc", "Value 'abc' of type 'str' could not be converted to Integer\n    full_key: seed"),
        ("monitor_mode=maxx", "Invalid value 'maxx', expected one of [min, max]\n    full_key: monitor_mode"),
        ("trainer.max_epoch=3", "Key 'max_epoch' not in 'TrainerConfig'"),
        ("trainer.max_epochs=abc", "could not be converted to Integer\n    full_key: trainer.max_epochs"),
        ("data.batchsize=8", "Could not override 'data.batchsize'"),
    ],
)
def test_typos_and_wrong_types_name_the_key(tmp_path, override, expected):
    with pytest.raises(ConfigCompositionException) as info:
        compose_train(tmp_path, ["+composite=sequential", override])
    assert expected in error_text(info.value)


def test_an_added_unknown_top_level_key_is_refused(tmp_path):
    cfg = compose_train(tmp_path, ["+composite=sequential", "+seedd=1"])  # `+` bypasses the schema
    with pytest.raises(train.ConfigError, match="unknown top-level key.s. seedd;"):
        train.build(cfg)
