"""FreezeSubmodels under a real Trainer: frozen, unfrozen into the one optimizer, guarded, resumed, under DDP."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from composites import GradientFlowError
from composites.training import FreezeSubmodels
from tests.processes import share_script
from tests.tiny_runs import fit, loader, model, module_for


class Snapshots(pl.Callback):
    """The encoder's weight and whether the optimizer holds it, at the end of each epoch."""

    def __init__(self):
        self.weights, self.held = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        encoder = pl_module.model.encoder
        self.weights.append(encoder.weight.detach().clone())
        held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.held.append(id(encoder.weight) in held)


def test_frozen_sub_model_trains_from_the_unfreeze_epoch_in_the_one_optimizer():
    module = module_for(model())
    before = module.model.encoder.weight.detach().clone()
    head_before = module.model.head.weight.detach().clone()
    snapshots = Snapshots()
    fit(module, epochs=3, callbacks=[FreezeSubmodels(["encoder"], unfreeze_at_epoch=2), snapshots])
    # epochs 0 and 1: frozen, so no gradient and no step, while the head trains (guard on: no problem raised)
    assert torch.equal(snapshots.weights[0], before) and torch.equal(snapshots.weights[1], before)
    assert not torch.equal(module.model.head.weight, head_before)
    assert not torch.equal(snapshots.weights[2], before)  # epoch 2: trained
    assert snapshots.held == [True, True, True]  # one optimizer, holding the encoder from the start
    assert module.model.encoder.weight.requires_grad


def test_the_guard_checks_parameters_once_they_are_unfrozen():
    module = module_for(model(cut=True))
    # frozen, the detached encoder is no problem; from the first backward after unfreezing it is
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        callbacks=[FreezeSubmodels("encoder", unfreeze_at_epoch=1)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(GradientFlowError) as caught:
        trainer.fit(module, train_dataloaders=loader())
    assert (trainer.current_epoch, trainer.global_step) == (1, 2)  # epoch 0's two steps passed
    assert {(p.parameter, p.cause) for p in caught.value.problems} == {
        ("encoder.weight", "detached"),
        ("encoder.bias", "detached"),
    }


class NaiveUnfreeze(pl.Callback):
    """Unfreezes without telling the optimizer: the bug the guard must catch."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.model.encoder.requires_grad_(True)


def test_a_parameter_unfrozen_outside_the_optimizer_is_reported():
    net = model()
    net.encoder.requires_grad_(False)  # frozen when the optimizer is built: left out of it
    module = module_for(net)
    with pytest.raises(GradientFlowError) as caught:
        fit(module, epochs=2, callbacks=[NaiveUnfreeze()])
    assert {(p.parameter, p.cause) for p in caught.value.problems} == {
        ("encoder.weight", "not_in_optimizer"),
        ("encoder.bias", "not_in_optimizer"),
    }


def test_frozen_for_good_stays_out_of_the_optimizer_and_unchanged():
    module = module_for(model())
    before = module.model.encoder.weight.detach().clone()
    snapshots = Snapshots()
    fit(module, epochs=1, callbacks=[FreezeSubmodels(["encoder"]), snapshots])
    assert snapshots.held == [False] and torch.equal(module.model.encoder.weight, before)


def test_a_run_resumed_after_unfreezing_keeps_training_the_sub_model(tmp_path):
    first = module_for(model())
    trainer = fit(first, epochs=2, callbacks=[FreezeSubmodels(["encoder"], unfreeze_at_epoch=1)])
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = module_for(model())
    snapshots = Snapshots()
    callbacks = [FreezeSubmodels(["encoder"], unfreeze_at_epoch=1), snapshots]
    fit(resumed, epochs=3, callbacks=callbacks, ckpt_path=tmp_path / "last.ckpt")  # the optimizer state loads as saved
    assert len(snapshots.weights) == 1 and not torch.equal(snapshots.weights[0], first.model.encoder.weight)


def test_an_unknown_sub_model_name_lists_the_ones_there_are():
    with pytest.raises(
        ValueError, match="no sub-model 'encodr' in the Sequential; its top-level sub-models are: encoder, head"
    ):
        fit(module_for(model()), epochs=1, callbacks=[FreezeSubmodels(["encodr"], unfreeze_at_epoch=1)])


DDP_FREEZE = """
import sys
from functools import partial
import pytorch_lightning as pl, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from composites import CompositeModule, Sequential
from composites.training import FreezeSubmodels

class Snapshots(pl.Callback):
    def __init__(self):
        self.weights = []
    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append(pl_module.model.encoder.weight.detach().clone())

torch.manual_seed(0)
model = Sequential({"encoder": nn.Linear(4, 8), "head": nn.Linear(8, 3)})
initial = model.encoder.weight.detach().clone()
module = CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
g = torch.Generator().manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)), batch_size=4)
snapshots = Snapshots()
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, limit_train_batches=2, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[FreezeSubmodels("encoder", unfreeze_at_epoch=1), snapshots])
trainer.fit(module, train_dataloaders=data)  # each rank sees its own half of the samples
torch.save({"initial": initial, "epochs": snapshots.weights}, f"{sys.argv[1]}/rank{trainer.global_rank}.pt")
"""


share_script("ddp_freeze", DDP_FREEZE)  # run with the session's other 2-rank Lightning scripts


@pytest.mark.slow
def test_under_ddp_the_unfrozen_sub_model_trains_in_step_on_every_rank(shared_scripts):
    folder = shared_scripts("ddp_freeze")
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:  # frozen in epoch 0 (DDP ran with the encoder unused), trained in epoch 1
        assert torch.equal(rank["epochs"][0], rank["initial"]) and not torch.equal(rank["epochs"][1], rank["initial"])
    # different samples on each rank, the same weights: the unfrozen encoder's gradients were all-reduced
    assert torch.equal(ranks[0]["epochs"][1], ranks[1]["epochs"][1])


def test_works_under_the_unified_lightning_trainer():
    lightning = pytest.importorskip("lightning")
    from composites.training import lightning as for_lightning

    module = for_lightning.CompositeModule(model(), nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    freeze = for_lightning.FreezeSubmodels(["encoder"], unfreeze_at_epoch=1)
    assert isinstance(freeze, lightning.pytorch.Callback)
    before = module.model.encoder.weight.detach().clone()
    trainer = lightning.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        callbacks=[freeze],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader())
    assert trainer.global_step == 2 and torch.equal(module.model.encoder.weight, before)  # frozen in epoch 0
