"""Every Hydra config composes and instantiates; bad overrides fail with an error naming the key."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import typing
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from omegaconf import OmegaConf

from composites import CompositeModule, Conditional, GradientGuardCallback, Parallel, Sequential
from composites.presets import DigitsDataModule
from composites.presets.models import ConvEncoder
from composites_hydra import ConfigError, NoCompositeError, available_composites, build, build_node
from composites_hydra.build import CONFIG_DIR
from composites_hydra.schema import TrainerConfig
from tests.scripts.train_helpers import ROOT, compose_train

COMPOSITES = ["conditional", "parallel", "sequential"]


def test_the_composite_group_lists_exactly_the_shipped_presets():
    assert available_composites() == COMPOSITES
    assert sorted(p.stem for p in (ROOT / "configs" / "composite").glob("*.yaml")) == COMPOSITES


@pytest.mark.parametrize(
    "name, inputs, first_stage",
    [("sequential", "image", ConvEncoder), ("parallel", "views", Parallel), ("conditional", "flat", Conditional)],
)
def test_each_composite_instantiates_a_real_model_for_its_data_view(tmp_path, name, inputs, first_stage):
    cfg = compose_train(tmp_path, [f"+composite={name}"])
    assert cfg.data.inputs == inputs
    datamodule, module, trainer = build(cfg)
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
    _, _, trainer = build(cfg)
    checkpoint = trainer.checkpoint_callback
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_last) == ("val/acc", "max", False)
    assert checkpoint.dirpath == str(tmp_path / "checkpoints")
    (last,) = [c for c in trainer.callbacks if isinstance(c, pl.callbacks.ModelCheckpoint) and c is not checkpoint]
    assert (last.monitor, last.filename, last.dirpath) == (None, "last", checkpoint.dirpath)  # every epoch
    assert isinstance(trainer.logger, pl.loggers.CSVLogger) and trainer.logger.log_dir == str(tmp_path / "logs") + "/"
    assert cfg.logger.flush_logs_every_n_steps == cfg.trainer.log_every_n_steps == 10  # rows on disk that often
    assert trainer.default_root_dir == str(tmp_path)
    assert [type(c).__name__ for c in trainer.callbacks].count("TerminalProgress") == 1  # no bar off a terminal


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
        built = build_node({**trainer, "accelerator": "cpu", "devices": 2}, logger=False)
        assert type(built.strategy).__name__ == "DDPStrategy" and built.num_devices == 2


def test_pipeline_preset_takes_split_microbatches_and_schedule(tmp_path):
    overrides = ["+composite=sequential", "trainer=pipeline", "trainer.strategy.split=[[encoder],[head]]"]
    trainer = compose_train(tmp_path, [*overrides, "trainer.strategy.schedule=gpipe"]).trainer
    built = build_node(trainer, logger=False)  # nothing is launched before fit
    strategy = built.strategy
    assert type(strategy).__name__ == "PipelineStrategy" and built.num_devices == 2
    assert (strategy.split, strategy.n_microbatches, strategy.schedule) == ([["encoder"], ["head"]], 4, "gpipe")


@pytest.mark.parametrize("name, cls", [("adam", torch.optim.Adam), ("sgd", torch.optim.SGD)])
def test_optimizer_presets_are_partials(tmp_path, name, cls):
    factory = build_node(compose_train(tmp_path, [f"optimizer={name}"]).optimizer)
    assert isinstance(factory, partial)
    assert isinstance(factory([torch.nn.Parameter(torch.zeros(1))]), cls)


def test_logger_presets(tmp_path):
    assert isinstance(build_node(compose_train(tmp_path).logger), pl.loggers.CSVLogger)
    node = compose_train(tmp_path, ["logger=tensorboard"]).logger
    assert node._target_ == "pytorch_lightning.loggers.TensorBoardLogger"
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        assert isinstance(build_node(node), pl.loggers.TensorBoardLogger)
    else:  # optional package: the error says what to install
        with pytest.raises(InstantiationException, match="Neither `tensorboard` nor `tensorboardX` is available"):
            build_node(node)


def test_param_groups_and_guard_mode_reach_the_module(tmp_path):
    cfg = compose_train(
        tmp_path, ["+composite=parallel", "guard=warn", "module.param_groups=[{prefix: fuse.image, lr: 0.0001}]"]
    )
    _, module, _ = build(cfg)
    assert module.guard_mode == "warn" and module.hparams.param_groups == [{"prefix": "fuse.image", "lr": 0.0001}]
    groups = module.configure_optimizers().param_groups
    assert [(g["name"], g["lr"]) for g in groups] == [("fuse.image", 0.0001), ("default", 0.001)]
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in module.model.fuse.image.parameters()}


def test_module_guard_is_a_node_of_the_guard_callbacks_arguments(tmp_path):
    overrides = [
        "+composite=conditional",
        "guard=warn",
        "module.guard.may_skip=[experts.*]",  # as the docs write it: no + needed
        "module.guard.starved_after=3",
        "module.guard.non_finite=apply",
        "module.guard.non_finite_patience=2",
    ]
    cfg = compose_train(tmp_path, overrides)
    _, module, _ = build(cfg)
    callback = module.guard_callback
    assert (callback.mode, callback.may_skip, callback.options["starved_after"]) == ("warn", ["experts.*"], 3)
    assert (callback.policy.policy, callback.policy.patience) == ("apply", 2)
    assert module.guard_mode == module.hparams.guard == "warn"
    assert isinstance(callback, GradientGuardCallback)  # the Trainer's package's callback


def test_module_guard_defaults_are_the_guard_callbacks_own(tmp_path):
    cfg = compose_train(tmp_path, ["+composite=sequential"])
    node = OmegaConf.to_container(cfg.module.guard, resolve=True, enum_to_str=True)
    defaults = {
        name: p.default for name, p in inspect.signature(GradientGuardCallback).parameters.items() if name in node
    }
    assert node == {**defaults, "may_skip": [], "mode": "raise"}
    assert sorted(node) == ["may_skip", "mode", "non_finite", "non_finite_patience", "starved_after"]


def test_a_scheduler_given_on_the_command_line_is_used(tmp_path):
    cosine = "scheduler={_target_: torch.optim.lr_scheduler.CosineAnnealingLR, _partial_: true, T_max: 10}"
    _, module, _ = build(compose_train(tmp_path, ["+composite=sequential", cosine]))
    config = module.configure_optimizers()
    assert isinstance(config["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)
    assert config["lr_scheduler"]["interval"] == "epoch" and config["lr_scheduler"]["scheduler"].T_max == 10


# ---------------------------------------------------------------- bad command lines
def error_text(error: BaseException) -> str:
    """Hydra wraps the OmegaConf error that names the key; the CLI prints both."""
    return f"{error}\n{error.__cause__}"


def test_no_composite_says_how_to_choose_one(tmp_path):
    cfg = compose_train(tmp_path)
    with pytest.raises(NoCompositeError, match=r"add \+composite=NAME, one of: conditional, parallel, sequential"):
        build(cfg)


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


def test_the_trainer_schema_read_from_lightnings_source_is_the_one_its_signature_gives():
    # The schema is built without importing Lightning (a compose error exits at once); it must
    # hold what asking the imported Trainer gives: each YAML-able argument, its type when simple.
    simple = {int, float, bool, str} | {typing.Optional[t] for t in (int, float, bool, str)}  # noqa: UP045
    hints = typing.get_type_hints(pl.Trainer.__init__)
    expected = [("_target_", str, "pytorch_lightning.Trainer")] + [
        (name, hints[name] if hints[name] in simple else typing.Any, p.default)
        for name, p in inspect.signature(pl.Trainer.__init__).parameters.items()
        if name not in {"self", "logger", "callbacks", "plugins"}
        and isinstance(p.default, (type(None), bool, int, float, str))
    ]
    fields = [(f.name, f.type, f.default) for f in dataclasses.fields(TrainerConfig)]
    assert fields == expected
    assert ("max_epochs", typing.Optional[int], None) in fields and len(fields) > 30  # noqa: UP045


def test_an_added_unknown_top_level_key_is_refused(tmp_path):
    cfg = compose_train(tmp_path, ["+composite=sequential", "+seedd=1"])  # `+` bypasses the schema
    with pytest.raises(ConfigError, match="unknown top-level key.s. seedd;"):
        build(cfg)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("compile=fast", "compile='fast': use true, false or a mapping of torch.compile arguments"),
        ("compile={fast: true}", "compile={'fast': True}: "),
        ("trainer._target_=torch.nn.Linear", "trainer._target_=torch.nn.Linear is not a Lightning Trainer"),
        ("trainer._target_=lightnin.Trainer", "trainer._target_=lightnin.Trainer cannot be imported"),
    ],
)
def test_a_bad_compile_setting_or_trainer_target_names_the_key(tmp_path, override, expected):
    with pytest.raises(ConfigError) as info:
        build(compose_train(tmp_path, ["+composite=sequential", override]))
    assert str(info.value).startswith(expected)


@pytest.mark.parametrize("monitor, mode", [("val/acc", "max"), ("val/loss", "min"), ("train/loss_epoch", "min")])
def test_the_checkpoint_mode_follows_the_monitor_unless_given(tmp_path, monitor, mode):
    _, _, trainer = build(compose_train(tmp_path, ["+composite=sequential", f"monitor={monitor}"]))
    assert (trainer.checkpoint_callback.monitor, trainer.checkpoint_callback.mode) == (monitor, mode)
    _, _, trainer = build(
        compose_train(tmp_path, ["+composite=sequential", f"monitor={monitor}", f"monitor_mode={mode}"])
    )
    assert trainer.checkpoint_callback.mode == mode


def test_composite_presets_leave_the_trainer_to_the_trainer_group():
    # +composite= is applied after the defaults: a trainer key there would override trainer=<preset>
    for path in (CONFIG_DIR / "composite").glob("*.yaml"):
        assert "trainer" not in OmegaConf.load(path), path.name


def test_a_per_step_scheduler_mapping_from_the_command_line(tmp_path):
    schedule = "scheduler={scheduler:{_target_:torch.optim.lr_scheduler.OneCycleLR,_partial_:true,max_lr:0.01,total_steps:100},interval:step}"
    _, module, _ = build(compose_train(tmp_path, ["+composite=sequential", schedule]))
    config = module.configure_optimizers()
    assert type(config["lr_scheduler"]["scheduler"]).__name__ == "OneCycleLR"
    assert config["lr_scheduler"]["interval"] == "step"


@pytest.mark.parametrize("override", ["data.val_fraction=0", "data.test_fraction=0", "data.val_fraction=0.9"])
def test_impossible_split_fractions_name_the_keys(tmp_path, override):
    with pytest.raises(InstantiationException, match=r"data\.val_fraction / data\.test_fraction"):
        build(compose_train(tmp_path, ["+composite=sequential", override]))
