"""Section lightning: one digits epoch through Lightning + CompositeModule vs a raw loop.

The model, data and optimizer are those of ``train.py +composite=sequential`` (conv encoder,
linear head, batch 64, Adam, accuracy). Every run starts from a copy of the same initial
weights and sees the batches in the same order, so both sides do identical arithmetic.
"""

from __future__ import annotations

import copy
import gc
import logging
import warnings
from collections.abc import Callable
from functools import partial

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from benchmarks import Row, Settings, Timings, compared, now
from composites import CompositeModule, Sequential
from composites.presets import DigitsDataModule
from composites.presets.models import MLP, ConvEncoder

TARGET = 1.10


def _metrics() -> MetricCollection:
    return MetricCollection({"acc": MulticlassAccuracy(num_classes=10)})


class _EpochClock(pl.Callback):
    """Time inside the epoch only: Trainer construction and fit setup/teardown excluded."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._start = now()

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seconds = now() - self._start


def _lightning(initial: nn.Module, loader: DataLoader, batches: int, **module_kwargs) -> Callable[[], float]:
    def run() -> float:
        clock = _EpochClock()
        module = CompositeModule(
            copy.deepcopy(initial), nn.CrossEntropyLoss(), partial(torch.optim.Adam, lr=1e-3), **module_kwargs
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=1,
            limit_train_batches=batches,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[clock],
        )
        trainer.fit(module, train_dataloaders=loader)
        return clock.seconds

    return run


def _raw(initial: nn.Module, loader: DataLoader, batches: int, metrics: bool) -> Callable[[], float]:
    """The loop a user writes by hand; with ``metrics`` it also tracks the same accuracy and mean loss."""
    acc = _metrics()  # built once, like CompositeModule's (whose construction is outside the epoch)

    def run() -> float:
        model = copy.deepcopy(initial)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn, total = nn.CrossEntropyLoss(), torch.zeros(())
        acc.reset()
        model.train()
        start = now()  # the epoch only, as the Lightning side's callback sees it
        for i, (x, y) in enumerate(loader):
            if i == batches:
                break
            optimizer.zero_grad()
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            optimizer.step()
            if metrics:
                acc.update(out.detach(), y)
                total += loss.detach()
        if metrics:
            acc.compute()
        return now() - start

    return run


def run(s: Settings) -> list[Row]:
    """One epoch (and one whole fit()) through CompositeModule + Trainer against the raw loop."""
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)  # no "GPU available: False" banners
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*val_dataloader.*")
    data = DigitsDataModule(inputs="image", batch_size=64)
    data.setup("fit")
    torch.manual_seed(0)
    initial = Sequential({"encoder": ConvEncoder(out_features=64), "head": MLP(64, 10, hidden=[])})

    def loader(batch_size: int) -> DataLoader:  # the same shuffled order for every run
        return DataLoader(
            data.train_set, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)
        )

    batches = 3 if s.quick else len(loader(64))  # 20 batches of 64 = one epoch
    big = 1 if s.quick else len(loader(256))
    cases: dict[str, Callable[[], float]] = {
        "lightning": _lightning(initial, loader(64), batches, metrics=_metrics()),
        "lightning bare": _lightning(initial, loader(64), batches, guard="off"),
        "raw": _raw(initial, loader(64), batches, metrics=True),
        "raw bare": _raw(initial, loader(64), batches, metrics=False),
        # Lightning's cost is per step: 4x the work per step should shrink the ratio ~4x.
        "lightning b256": _lightning(initial, loader(256), big, metrics=_metrics()),
        "raw b256": _raw(initial, loader(256), big, metrics=True),
    }
    # A run lasts 0.05-0.5 s, far above a block: one call per round, plus the in-epoch time
    # the callback saw, paired with the same round's raw loop.
    rounds = 1 if s.quick else 20
    times: dict[str, list[float]] = {name: [] for name in cases}  # the whole call
    times.update({f"{name} epoch": [] for name in cases})  # the epoch inside it
    for fn in cases.values():
        fn()  # warm-up: the first fit pays one-time imports and lazy init
    gc.collect()
    gc.freeze()  # a full collection costs ~0.3 s here; frozen, the per-run one is cheap
    order = list(cases)
    try:
        for _ in range(rounds):
            order = order[1:] + order[:1]  # rotate so no case always runs first
            for name in order:
                gc.collect()
                start = now()
                inner = cases[name]()
                times[name].append(now() - start)
                times[f"{name} epoch"].append(inner)
    finally:
        gc.unfreeze()
    t = Timings(times)
    return [
        compared(
            "lightning",
            "epoch: CompositeModule+Trainer / raw loop",
            t,
            "lightning epoch",
            "raw epoch",
            TARGET,
            f"in-epoch time, {batches} batches of 64; guard on; accuracy and mean loss on both sides",
        ),
        compared(
            "lightning",
            "whole fit(): CompositeModule+Trainer / raw loop",
            t,
            "lightning",
            "raw",
            note="incl. Trainer() and fit setup/teardown",
        ),
        compared(
            "lightning",
            "epoch: Lightning bare (guard off, no metrics) / raw bare",
            t,
            "lightning bare epoch",
            "raw bare epoch",
            note="Lightning's own loop, CompositeModule's logging",
        ),
        compared(
            "lightning",
            "epoch: raw with metrics / raw bare",
            t,
            "raw epoch",
            "raw bare epoch",
            note="the metric bookkeeping itself",
        ),
        compared(
            "lightning",
            "epoch at batch 256: CompositeModule+Trainer / raw loop",
            t,
            "lightning b256 epoch",
            "raw b256 epoch",
            note=f"{big} batches of 256: same data, a quarter of the steps",
        ),
    ]
