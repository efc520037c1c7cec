"""Pretrained sub-models: load_pretrained from a real run's checkpoint, FreezeSubmodels under a real Trainer."""

from __future__ import annotations

from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, GradientFlowError, Sequential
from composites.modules import PretrainedKeysError, load_pretrained
from composites.training import FreezeSubmodels
from composites_hydra import build_node
from tests.processes import share_script


def loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=generator), torch.randint(0, 3, (16,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=4)


def model(cut: bool = False) -> Sequential:
    torch.manual_seed(0)
    stages = {"encoder": nn.Linear(4, 8), "head": nn.Linear(8, 3)}
    if cut:  # a silent bug in the hand-off: the encoder's output is detached before the head
        stages = {"encoder": stages["encoder"], "cut": Detach(), "head": stages["head"]}
    return Sequential(stages)


class Detach(nn.Module):
    def forward(self, x):
        return x.detach()


def module_for(net: nn.Module) -> CompositeModule:
    return CompositeModule(net, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))


def fit(module: CompositeModule, epochs: int, callbacks=(), ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=loader(), ckpt_path=ckpt_path)
    return trainer


class Snapshots(pl.Callback):
    """The encoder's weight and whether the optimizer holds it, at the end of each epoch."""

    def __init__(self):
        self.weights, self.held = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        encoder = pl_module.model.encoder
        self.weights.append(encoder.weight.detach().clone())
        held = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.held.append(id(encoder.weight) in held)


@pytest.fixture(scope="module")
def earlier_run(tmp_path_factory):
    """An earlier run's Lightning checkpoint (keys model.encoder.*, model.head.*) and its model."""
    module = module_for(model())
    trainer = fit(module, epochs=1)
    path = tmp_path_factory.mktemp("run") / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, module.model


def test_a_sub_model_loads_from_an_earlier_runs_checkpoint_by_key_prefix(earlier_run):
    path, trained = earlier_run
    encoder = load_pretrained(nn.Linear(4, 8), path, prefix="model.encoder.")
    assert torch.equal(encoder.weight, trained.encoder.weight) and torch.equal(encoder.bias, trained.encoder.bias)
    assert encoder.weight.requires_grad  # loading does not freeze unless asked
    assert not load_pretrained(nn.Linear(8, 3), path, prefix="model.head.", freeze=True).weight.requires_grad


def pretrained_encoder_node(path, prefix: str) -> dict:
    """The YAML of an encoder sub-model wrapped in load_pretrained, as a config holds it."""
    module = {"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 8}
    return {"_target_": "composites.modules.load_pretrained", "module": module, "path": str(path), "prefix": prefix}


def test_yaml_wraps_the_sub_model_node_in_load_pretrained(earlier_run):
    path, trained = earlier_run
    node = pretrained_encoder_node(path, prefix="model.encoder.")
    encoder = build_node(node)
    assert isinstance(encoder, nn.Linear) and torch.equal(encoder.weight, trained.encoder.weight)


def test_through_hydra_the_error_keeps_its_lines(earlier_run):
    path, _ = earlier_run
    node = pretrained_encoder_node(path, prefix="encoder.")
    with pytest.raises(InstantiationException) as caught:  # Hydra shows repr(error) of a failed _target_
        build_node(node)
    assert (
        f"PretrainedKeysError: no key in {path} starts with the prefix 'encoder.':\n"
        "  fix: prefix: 'model.encoder.' (the checkpoint's keys look like that + the sub-model's)" in str(caught.value)
    )


def test_a_prefix_mapping_renames_keys_of_a_state_dict_file(tmp_path):
    source = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    path = tmp_path / "weights.pt"
    torch.save({**{f"backbone.{k}": v for k, v in source.state_dict().items()}, "other.w": torch.ones(1)}, path)
    target = Sequential({"first": nn.Linear(4, 8), "second": nn.Linear(8, 3)})
    load_pretrained(target, path, prefix={"backbone.0.": "first.", "backbone.1.": "second."})
    assert torch.equal(target.first.weight, source[0].weight) and torch.equal(target.second.bias, source[1].bias)


def test_strict_by_default_the_error_lists_missing_and_unexpected_keys(earlier_run):
    path, trained = earlier_run
    wider = Sequential({"encoder": nn.Linear(4, 8), "extra": nn.Linear(8, 8)})  # no head, an extra stage
    with pytest.raises(PretrainedKeysError) as caught:
        load_pretrained(wider, path, prefix="model.")
    err = caught.value
    assert err.missing == ["extra.weight", "extra.bias"] and err.unexpected == ["head.weight", "head.bias"]
    assert str(err).splitlines() == [
        f"the weights in {path} do not fit the sub-model:",
        "  2 missing (the sub-model has them, the checkpoint not): extra.weight, extra.bias",
        "  2 unexpected (the checkpoint has them, the sub-model not): head.weight, head.bias",
        "  fix: choose the prefix that selects exactly this sub-model's keys, or strict: false to load what fits",
    ]
    load_pretrained(wider, path, prefix="model.", strict=False)  # what fits is loaded, the rest stays as built
    assert torch.equal(wider.encoder.weight, trained.encoder.weight)


def test_a_wrong_prefix_and_a_wrong_shape_are_named(earlier_run):
    path, _ = earlier_run
    with pytest.raises(PretrainedKeysError, match=r"fix: prefix: 'model\.encoder\.'"):
        load_pretrained(nn.Linear(4, 8), path)  # the keys are model.encoder.*: the prefix that fits is named
    with pytest.raises(PretrainedKeysError, match=r"no key in .* starts with the prefix 'model\.enc\.'"):
        load_pretrained(nn.Linear(4, 8), path, prefix="model.enc.")
    with pytest.raises(PretrainedKeysError) as caught:
        load_pretrained(nn.Linear(4, 16), path, prefix="model.encoder.", strict=False)  # shapes never pass
    assert caught.value.mismatched == [("weight", (8, 4), (16, 4)), ("bias", (8,), (16,))]


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
    from composites.training import using_lightning

    with using_lightning("lightning"):
        module = module_for(model())
        freeze = FreezeSubmodels(["encoder"], unfreeze_at_epoch=1)
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
