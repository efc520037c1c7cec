"""Non-finite steps under guard='warn': skipped and counted, K in a row stop; a NaN checkpoint is never written."""

from __future__ import annotations

import warnings
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, GradientGuardCallback, Sequential
from composites.training import NonFiniteCheckpointError, NonFiniteStepsError


def data(nan_batches: set[int], n_batches: int = 4) -> DataLoader:
    """Batches of 4 samples; the inputs of the listed batches hold a NaN (a bad record in the data)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4 * n_batches, 4, generator=g)
    for b in nan_batches:
        x[4 * b, 0] = float("nan")
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (4 * n_batches,), generator=g)), batch_size=4)


def module(guard) -> CompositeModule:
    torch.manual_seed(0)
    model = Sequential({"encoder": nn.Linear(4, 4), "head": nn.Linear(4, 3)})
    return CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.Adam, lr=1e-2), guard=guard)


def fit(m: CompositeModule, loader: DataLoader, tmp_path=None, callbacks=(), logger=False) -> pl.Trainer:
    checkpoint = [ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)] if tmp_path else []
    t = pl.Trainer(
        max_epochs=1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=bool(tmp_path),
        callbacks=[*checkpoint, *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(m, loader)
    return t


def finite(m: CompositeModule) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in m.parameters())


def test_warn_skips_a_nan_step_counts_it_and_keeps_training_with_finite_weights(tmp_path):
    m = module("warn")
    t = fit(m, data(nan_batches={1}), tmp_path)
    assert t.global_step == 4  # Lightning counts the skipped step; the optimizer changed nothing in it
    assert m.guard_callback.policy.skipped == 1 and m.guard_callback.policy.in_a_row == 0
    assert finite(m)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert all(bool(torch.isfinite(v).all()) for v in saved.values() if v.is_floating_point())


def test_the_epochs_train_loss_leaves_the_skipped_step_out(tmp_path):
    m = module("warn")
    losses = []

    class Watch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    t = fit(m, data(nan_batches={1}), callbacks=[Watch()])
    assert m.guard_callback.policy.skipped == 1 and losses[1] != losses[1]  # batch 1's loss is NaN
    kept = [losses[0], losses[2], losses[3]]  # equal batch sizes: the mean of the three stepped batches
    assert float(t.callback_metrics["train/loss_epoch"]) == pytest.approx(sum(kept) / 3, rel=1e-6)


def test_a_skipped_step_leaves_weights_and_optimizer_state_as_they_were():
    m = module("warn")
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 1:
                seen["before"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 1:
                seen["after"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
                seen["adam_steps"] = {int(s["step"]) for s in trainer.optimizers[0].state.values()}

    fit(m, data(nan_batches={1}), callbacks=[Watch()])
    assert all(torch.equal(seen["before"][n], seen["after"][n]) for n in seen["before"])
    assert seen["adam_steps"] == {1}  # Adam stepped for batch 0 only, not for the NaN batch


def test_k_non_finite_steps_in_a_row_stop_training_with_the_weights_still_finite():
    callback = GradientGuardCallback("warn", non_finite_patience=2)
    m = module(callback)
    with pytest.raises(NonFiniteStepsError, match=r"2 optimizer steps in a row had non-finite gradients") as info:
        fit(m, data(nan_batches={1, 2, 3}))
    assert info.value.in_a_row == 2 and {p.cause for p in info.value.problems} == {"non_finite"}
    assert finite(m) and callback.policy.skipped == 2


def test_a_run_stopped_by_non_finite_steps_logs_how_many_it_skipped(tmp_path):
    callback = GradientGuardCallback("warn", non_finite_patience=2)
    logger = CSVLogger(tmp_path, name="", version="")
    with pytest.raises(NonFiniteStepsError):
        fit(module(callback), data(nan_batches={1, 2, 3}), logger=logger)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("guard/skipped_steps")
    assert [row.split(",")[column] for row in rows[1:] if row.split(",")[column]] == ["1.0", "2.0"]


def test_raise_stops_at_the_first_nan_step_as_before():
    m = module("raise")
    with pytest.raises(Exception, match="non_finite"):
        fit(m, data(nan_batches={0}))
    assert finite(m)


@pytest.mark.parametrize("guard", ["off", GradientGuardCallback("warn", non_finite="apply")])
def test_a_checkpoint_with_nan_weights_is_never_written_whatever_the_guard_does(tmp_path, guard):
    m = module(guard)
    with pytest.raises(NonFiniteCheckpointError, match=r"not writing a checkpoint at step 4: weights .*NaN/Inf"):
        fit(m, data(nan_batches={1}), tmp_path)
    assert not finite(m)  # the NaN step was applied ...
    assert list(tmp_path.iterdir()) == []  # ... and no checkpoint holds it
