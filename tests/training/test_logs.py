"""Output a person can live with: no Lightning noise, Lightning's log in train.log, no progress-bar flood."""

from __future__ import annotations

import logging
import warnings
from functools import partial

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from composites import CompositeModule, Sequential
from composites.training import TerminalProgress, quiet_lightning, route_lightning_logs
from composites.training.logs import LIGHTNING_LOGGERS
from tests import ROOT


def loader(n: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)), 8)


def module() -> CompositeModule:
    model = Sequential({"encoder": nn.Linear(4, 4), "head": nn.Linear(4, 3)})
    return CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.SGD, lr=0.1))


@pytest.fixture
def lightning_loggers():
    """Lightning's loggers as they were, restored after the test (routing changes them for the process)."""
    saved = {
        name: (logging.getLogger(name).propagate, list(logging.getLogger(name).handlers)) for name in LIGHTNING_LOGGERS
    }
    yield
    for name, (propagate, handlers) in saved.items():
        logger = logging.getLogger(name)
        logger.propagate, logger.handlers = propagate, handlers


def test_quiet_lightning_drops_the_tips_the_srun_hint_and_the_leafspec_deprecation(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()
        t = pl.Trainer(max_epochs=1, default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
        t.fit(module(), loader())
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "Tip:" in m or "`srun`" in m or "LeafSpec" in m]
    assert any("`Trainer.fit` stopped" in r.getMessage() for r in caplog.records)  # the rest is still said


def test_lightnings_log_reaches_a_file_handler_on_the_root_logger(tmp_path, lightning_loggers):
    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "train.log")
    root.addHandler(handler)
    level, root.level = root.level, logging.INFO
    try:
        route_lightning_logs()
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(module(), loader())
    finally:
        root.removeHandler(handler)
        root.level = level
        handler.close()
    text = (tmp_path / "train.log").read_text()
    assert "GPU available" in text and "`Trainer.fit` stopped: `max_epochs=1` reached." in text


def test_off_a_terminal_the_bar_is_off_and_each_epoch_is_one_log_line(caplog):
    caplog.set_level(logging.INFO, logger="composites")
    progress = TerminalProgress(interactive=False)
    t = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, callbacks=[progress])
    t.fit(module(), loader(), loader())
    assert not t.progress_bar_callback.is_enabled
    lines = [r.getMessage() for r in caplog.records if r.name == "composites"]
    assert [line.split("  ")[:2] for line in lines] == [["Epoch 0/1", "step 2"], ["Epoch 1/1", "step 4"]]
    assert [k.split()[0] for k in lines[1].split("  ")[2:]] == ["train/loss", "val/loss"]


def test_on_a_terminal_the_bar_stays():
    t = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, callbacks=[TerminalProgress(interactive=True)]
    )
    t.fit(module(), loader())
    assert t.progress_bar_callback.is_enabled


def test_logger_tensorboard_works_out_of_the_box(tmp_path):
    from omegaconf import OmegaConf

    from composites_hydra import build_node  # importing composites_hydra registers ${lightning:...}

    conf = OmegaConf.load(ROOT / "configs" / "logger" / "tensorboard.yaml")
    logger = build_node(conf, save_dir=str(tmp_path))
    pl.Trainer(max_epochs=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False).fit(
        module(), loader()
    )
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("interactive", [False, True])
def test_the_log_file_gets_every_epoch_line_before_lightnings_closing_line(tmp_path, lightning_loggers, interactive):
    root = logging.getLogger()
    file = logging.FileHandler(tmp_path / "train.log")
    screen = logging.StreamHandler(open(tmp_path / "screen.txt", "w"))  # what a terminal would show
    root.addHandler(file)
    root.addHandler(screen)
    level, root.level = root.level, logging.INFO
    try:
        route_lightning_logs()
        progress = TerminalProgress(interactive=interactive)
        trainer = pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, callbacks=[progress])
        trainer.fit(module(), loader(), loader())
    finally:
        for handler in (file, screen):
            root.removeHandler(handler)
            handler.close()
        root.level = level
    lines = (tmp_path / "train.log").read_text().splitlines()
    said = [line.split("  ")[:2] for line in lines if line.startswith("Epoch")]
    assert said == [["Epoch 0/1", "step 2"], ["Epoch 1/1", "step 4"]]
    closing = lines.index("`Trainer.fit` stopped: `max_epochs=2` reached.")
    assert closing == len(lines) - 1  # after the last epoch's line
    shown = (tmp_path / "screen.txt").read_text()
    # on a terminal the bar shows the epochs: the lines go to the file only
    assert ("Epoch 1/1  step 4" in shown) is not interactive
    assert "`Trainer.fit` stopped" in shown
