"""composites' Lightning classes work with the unified `lightning` package and with `pytorch_lightning`."""

from __future__ import annotations

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
from composites.training import chosen_package, using_lightning
from composites.training import lightning as for_lightning
from composites.training import pytorch_lightning as for_pl
from tests.processes import run_script

PACKAGES = {"lightning": L, "pytorch_lightning": pl}

# A user's script: imports ONE Lightning package (after composites, as isort orders them), then the
# unqualified names from composites. Prints what ran and which packages ended up imported.
USER_SCRIPT = """
from functools import partial
import sys
import torch
from torch import nn
from composites import CompositeModule, DigitsDataModule, GradientGuardCallback, GradNormPlot, Sequential
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
import lightning, pytorch_lightning  # both now, as a library might: the program's choice stays
from composites.training.flavours import package_of
print("later", package_of(CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))))
"""


@pytest.mark.parametrize(
    ("import_line", "package"),
    [("from lightning import Trainer", "lightning"), ("from pytorch_lightning import Trainer", "pytorch_lightning")],
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
    classes = {"lightning": for_lightning, "pytorch_lightning": for_pl}[package]
    module = classes.CompositeModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    plot = classes.GradNormPlot(every_n_steps=1)
    assert isinstance(module, api.LightningModule) and isinstance(module, composites.CompositeModule)
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


def test_a_program_importing_both_builds_pytorch_lightning_unless_told_otherwise():
    assert chosen_package() == "pytorch_lightning"  # this test process has imported both
    module = composites.CompositeModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    assert isinstance(module, pl.LightningModule) and not isinstance(module, L.LightningModule)
    with using_lightning("lightning.Trainer"):  # a Trainer's _target_ works too
        module = composites.CompositeModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
        data = composites.DigitsDataModule()
    assert isinstance(module, L.LightningModule) and isinstance(data, L.LightningDataModule)
    assert type(module) is for_lightning.CompositeModule
    assert composites.CompositeModule.for_lightning("lightning") is for_lightning.CompositeModule


def test_an_unknown_package_name_is_an_error_naming_both():
    with pytest.raises(
        ValueError, match="unknown Lightning package 'lightnin': use one of pytorch_lightning, lightning"
    ):
        with using_lightning("lightnin"):
            pass


def test_a_callback_of_the_other_package_says_how_to_get_the_right_one():
    callback = for_pl.GradientGuardCallback("raise")
    module = for_lightning.CompositeModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, callbacks=[callback])
    with pytest.raises(
        TypeError,
        match=r"GradientGuardCallback is the pytorch_lightning class but the Trainer is lightning's.*composites\.training\.lightning",
    ):
        trainer.fit(module, loader())


class UserModule(composites.CompositeModule):
    """A user's subclass of the unqualified class: it follows the same rule and pickles."""


def test_a_users_subclass_becomes_a_lightning_module_of_the_chosen_package_and_pickles():
    with using_lightning("lightning"):
        module = UserModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    assert isinstance(module, L.LightningModule) and isinstance(module, UserModule)
    copy = pickle.loads(pickle.dumps(module))
    assert type(copy) is type(module) and torch.equal(copy.model.head.weight, module.model.head.weight)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(copy, loader())
    assert trainer.global_step == 2


def test_the_unqualified_class_loads_a_checkpoint_as_the_chosen_packages_class(tmp_path):
    module = composites.CompositeModule(two_stage(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    trainer.fit(module, loader())
    path = trainer.checkpoint_callback.best_model_path
    loaded = composites.CompositeModule.load_from_checkpoint(
        path, model=two_stage(), loss=nn.CrossEntropyLoss(), optimizer=partial(torch.optim.SGD, lr=0.1)
    )
    assert type(loaded) is for_pl.CompositeModule and loaded.guard_mode == "raise"
    assert torch.equal(loaded.model.head.weight, module.model.head.weight)
