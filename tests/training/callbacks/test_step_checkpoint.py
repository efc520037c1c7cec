"""StepCheckpoint: under DDP the time-based save is agreed by a collective only on logged steps; saves say nothing."""

from __future__ import annotations

import logging
from functools import partial
from types import SimpleNamespace

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, Sequential
from composites.training import StepCheckpoint


class Ranks:
    """A two-rank trainer as the callback sees it: the global step, the logging cadence, the agreement."""

    def __init__(self, log_every_n_steps: int):
        self.world_size, self.log_every_n_steps, self.global_step = 2, log_every_n_steps, 0
        self.is_last_batch = self.sanity_checking = False
        self.agreements: list[int] = []  # the steps at which a collective ran
        self.saves: list[int] = []
        self.strategy = SimpleNamespace(reduce_boolean_decision=self._agree)

    def _agree(self, decision: bool, all: bool = True) -> bool:
        self.agreements.append(self.global_step)
        return decision

    def save_checkpoint(self, path, weights_only=None) -> None:
        assert weights_only is False  # the whole state, said explicitly: Lightning logs a line per save otherwise
        self.saves.append(self.global_step)


def test_under_ddp_the_time_cadence_costs_a_collective_only_on_logged_steps(tmp_path):
    callback = StepCheckpoint(tmp_path, every_n_steps=None, every_minutes=1e-9)  # always late
    trainer = Ranks(log_every_n_steps=5)
    for _ in range(12):
        callback.on_train_batch_start(trainer, None, None, 0)
        trainer.global_step += 1  # this batch stepped the optimizer
        callback.on_train_batch_end(trainer, None, None, None, 0)
    assert trainer.agreements == [5, 10]
    assert trainer.saves == [5, 10]


def test_a_save_every_step_logs_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    model = Sequential({"encoder": nn.Linear(4, 4), "head": nn.Linear(4, 3)})
    module = CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))
    data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=4)
    callback = StepCheckpoint(tmp_path, every_n_steps=1)
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    assert (tmp_path / "last.ckpt").is_file()
    assert [r.getMessage() for r in caplog.records if "weights_only" in r.getMessage()] == []
