"""A tiny two-stage composite, its CompositeModule and a short pytorch_lightning fit, shared by tests."""

from __future__ import annotations

from functools import partial

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, Sequential


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
