"""Mid-epoch checkpoints are taken only where the optimizer stepped: never inside gradient accumulation."""

from __future__ import annotations

import os
import signal
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, Sequential
from composites.training import SignalCheckpoint, TrainingInterrupted


class SigtermAtBatch(pl.Callback):
    """Sends this process a real SIGTERM when the training batch ``batch_idx`` starts."""

    def __init__(self, batch_idx: int):
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_inside_gradient_accumulation_saves_after_the_step_it_belongs_to(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)), 8)
    module = CompositeModule(
        Sequential({"encoder": nn.Linear(4, 4), "head": nn.Linear(4, 3)}),
        nn.CrossEntropyLoss(),
        partial(torch.optim.SGD, lr=0.1),
    )
    trainer = pl.Trainer(
        max_epochs=1,
        accumulate_grad_batches=2,
        callbacks=[SigtermAtBatch(2), SignalCheckpoint(tmp_path, resume_hint="-")],  # batch 2: 1st of step 2
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.fit(module, data)
    assert stopped.value.step == 2  # saved after batch 3, whose optimizer step used batches 2 and 3
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 3
