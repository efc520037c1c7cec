"""composites' Lightning classes work with the unified `lightning` package and with `pytorch_lightning`."""

from __future__ import annotations

import importlib
import pickle
from functools import partial

import lightning as L
import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import composites
from composites import Sequential
from composites.training import lightning as for_lightning
from composites.training import pytorch_lightning as for_pl
from composites.training.module import CompositeModuleBase
from composites.training.packages import lightning_api, package_name, package_of
from tests.processes import run_script

PACKAGES = {"lightning": L, "pytorch_lightning": pl}
CLASSES = {"lightning": for_lightning, "pytorch_lightning": for_pl}

# A user's script: imports composites, then ONE Lightning package and composites' classes of that
# package. Prints what ran and which packages ended up imported.
USER_SCRIPT = """
from functools import partial
import sys
import torch
from torch import nn
import composites
from composites import Sequential
import composites.training
print("before", sorted(m for m in ("lightning", "pytorch_lightning") if m in sys.modules))
{import_line}

model = Sequential({{"flat": nn.Flatten(), "head": nn.Linear(64, 10)}})
module = CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
trainer = Trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, callbacks=[GradNormPlot(dirpath="plot")])
trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
print("steps", trainer.global_step, "ok", module.report.ok, "png", GradNormPlot is not None)
print("imported", sorted(m for m in ("lightning", "pytorch_lightning") if m in sys.modules))
import lightning, pytorch_lightning  # both now, as a library might: nothing changes type
from composites.training.packages import package_of
print("later", package_of(CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))))
"""


@pytest.mark.parametrize(
    ("import_line", "package"),
    [
        (
            "from lightning import Trainer\n"
            "from composites.training.lightning import CompositeModule, DigitsDataModule, GradNormPlot",
            "lightning",
        ),
        (
            "from pytorch_lightning import Trainer\n"
            "from composites import CompositeModule\n"
            "from composites.presets import DigitsDataModule\n"
            "from composites.training import GradNormPlot",
            "pytorch_lightning",
        ),
    ],
)
def test_a_script_importing_one_lightning_package_trains_composites_classes_with_its_trainer(
    tmp_path, import_line, package
):
    done = run_script(tmp_path / "user.py", USER_SCRIPT.format(import_line=import_line), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == "before []"  # importing composites imports no Lightning
    assert lines[-3] == "steps 2 ok True png True"
    assert lines[-2] == f"imported {[package]}"  # composites pulled in no other Lightning
    assert lines[-1] == f"later {package}"
    assert (tmp_path / "plot" / "grad_norms.png").exists()


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)), 8)


def two_stage() -> Sequential:
    return Sequential({"encoder": nn.Linear(4, 4), "head": nn.Linear(4, 3)})


@pytest.mark.parametrize("package", list(PACKAGES))
def test_the_explicit_classes_of_each_package_train_with_that_packages_trainer(package, tmp_path):
    api = PACKAGES[package]
    classes = CLASSES[package]
    module = classes.CompositeModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    plot = classes.GradNormPlot(every_n_steps=1)
    assert isinstance(module, api.LightningModule) and isinstance(module, CompositeModuleBase)
    assert isinstance(plot, api.Callback) and isinstance(classes.DigitsDataModule(), api.LightningDataModule)
    trainer = api.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[plot],
        default_root_dir=tmp_path,  # the plot's PNG goes there, not into the repository
    )
    trainer.fit(module, loader())
    assert trainer.global_step == 2 and module.report.ok
    assert [s for s, _ in plot.history["head"]] == [0, 1]


def test_the_classes_are_real_subclasses_of_their_packages_classes_and_keep_their_type():
    for package, api in PACKAGES.items():
        classes = CLASSES[package]
        assert issubclass(classes.CompositeModule, api.LightningModule)
        assert issubclass(classes.DigitsDataModule, api.LightningDataModule)
        assert issubclass(classes.FSDP2Strategy, lightning_api(package).strategies.ModelParallelStrategy)
        assert issubclass(classes.ExpertParallelStrategy, lightning_api(package).strategies.DDPStrategy)
        assert issubclass(classes.PipelineStrategy, lightning_api(package).strategies.DDPStrategy)
        strategies = {"FSDP2Strategy", "ExpertParallelStrategy", "PipelineStrategy"}
        for name in set(classes.__all__) - {"CompositeModule", "DigitsDataModule", *strategies}:
            assert issubclass(getattr(classes, name), api.Callback), name
        module = classes.CompositeModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
        assert type(module) is classes.CompositeModule
    assert composites.CompositeModule is for_pl.CompositeModule  # the front door is pytorch_lightning's
    assert composites.training.StepCheckpoint is for_pl.StepCheckpoint
    assert composites.presets.DigitsDataModule is for_pl.DigitsDataModule
    assert not issubclass(composites.CompositeModule, L.LightningModule)
    assert not issubclass(for_lightning.CompositeModule, pl.LightningModule)


def test_an_unknown_package_name_is_an_error_naming_both():
    with pytest.raises(
        ValueError, match="unknown Lightning package 'lightnin': use one of pytorch_lightning, lightning"
    ):
        package_name("lightnin")


def test_a_callback_of_the_other_package_says_how_to_get_the_right_one():
    callback = for_pl.GradientGuardCallback("raise")
    module = for_lightning.CompositeModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[callback])
    with pytest.raises(
        TypeError,
        match=r"^GradientGuardCallback is pytorch_lightning's but the Trainer is lightning's: "
        r"use `from composites\.training\.lightning import GradientGuardCallback`$",
    ):
        trainer.fit(module, loader())


def test_a_data_module_of_the_other_package_says_how_to_get_the_right_one():
    module = for_lightning.CompositeModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False)
    with pytest.raises(
        TypeError,
        match=r"^DigitsDataModule is pytorch_lightning's but the Trainer is lightning's: "
        r"use `from composites\.training\.lightning import DigitsDataModule`$",
    ):
        trainer.fit(module, datamodule=for_pl.DigitsDataModule())


def test_a_module_or_strategy_of_the_other_package_is_refused_by_lightning_itself_naming_the_class():
    # Lightning checks the module and the strategy before any of our code sees its Trainer: its message is the one
    module = for_pl.CompositeModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False)
    with pytest.raises(TypeError, match=r"`model` must be a `LightningModule`.*got `CompositeModule`"):
        trainer.fit(module, loader())
    with pytest.raises(
        ValueError, match=r"invalid strategy name: `strategy=<composites\.training\.pytorch_lightning\.FSDP2Strategy"
    ):
        L.Trainer(strategy=for_pl.FSDP2Strategy(), logger=False)


class UserModule(for_lightning.CompositeModule):
    """A user's subclass of the lightning class: an ordinary subclass, pickled the ordinary way."""


@pytest.mark.parametrize("cls", [composites.CompositeModule, UserModule])
def test_modules_pickle_without_hooks_and_train_after(cls):
    module = cls(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    copy = pickle.loads(pickle.dumps(module))
    assert type(copy) is cls and torch.equal(copy.model.head.weight, module.model.head.weight)
    api = PACKAGES[package_of(cls)]
    trainer = api.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(copy, loader())
    assert trainer.global_step == 2


def test_the_class_loads_a_checkpoint_as_itself(tmp_path):
    module = composites.CompositeModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, loader())
    path = trainer.checkpoint_callback.best_model_path
    loaded = composites.CompositeModule.load_from_checkpoint(
        path, model=two_stage(), loss=nn.CrossEntropyLoss(), optimizer=partial(torch.optim.SGD, lr=0.1)
    )
    assert type(loaded) is for_pl.CompositeModule and loaded.guard_mode == "raise"
    assert torch.equal(loaded.model.head.weight, module.model.head.weight)


@pytest.mark.parametrize("package", list(PACKAGES))
def test_lightning_cli_takes_the_module_and_the_data_module_of_each_package(package, tmp_path):
    cli_module = {"lightning": "lightning.pytorch.cli", "pytorch_lightning": "pytorch_lightning.cli"}[package]
    LightningCLI = importlib.import_module(cli_module).LightningCLI
    classes = CLASSES[package]
    args = {
        "trainer": {"max_epochs": 1, "logger": False, "default_root_dir": str(tmp_path)},
        "model": {
            "model": {"class_path": "composites.presets.MLP", "init_args": {"in_features": 64, "out_features": 10}},
            "loss": {"class_path": "torch.nn.CrossEntropyLoss"},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1}},
            "guard": {"mode": "warn", "may_skip": ["net.3.*"]},
        },
        "data": {"inputs": "flat", "batch_size": 32},
    }
    cli = LightningCLI(
        classes.CompositeModule, classes.DigitsDataModule, run=False, args=args, save_config_callback=None
    )
    assert type(cli.model) is classes.CompositeModule and type(cli.datamodule) is classes.DigitsDataModule
    assert cli.model.guard_mode == "warn" and cli.model.guard_callback.may_skip == ["net.3.*"]
    assert cli.datamodule.batch_size == 32 and isinstance(cli.trainer, PACKAGES[package].Trainer)
    assert cli.model.configure_optimizers().param_groups[0]["lr"] == 0.1
