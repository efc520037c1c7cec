"""Cheap per-step bookkeeping for CompositeModule: epoch means kept on device, step logs only when written.

Each ``self.log`` call costs Lightning a walk over its result object (~0.4-0.9 ms on a small CPU), so
logging every step costs more than a small model's step. What is logged every step is only ever
written once per epoch or once every ``log_every_n_steps`` steps; the helpers here let the module
accumulate cheaply and call ``self.log`` only then.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

if TYPE_CHECKING:
    import pytorch_lightning as pl


class RunningMean(Metric):
    """Sample-weighted mean of a scalar over an epoch, accumulated on the value's device.

    It accumulates exactly as Lightning does for ``self.log(name, value, on_epoch=True,
    batch_size=n)`` (sum of ``value * n`` in at least float32, an integer count, one division at
    the end), so logging this metric once per epoch gives the same number as logging the value
    every step did, without a host sync or a ``self.log`` per step. ``compute()`` sums both states
    over DDP ranks when ``sync_on_compute`` is on: every rank then gets the global mean.

    Args:
        sync_on_compute: sum the states over ranks in ``compute()`` (the default); off for a
            training loss, which is logged per rank.

    Example:
        >>> import torch
        >>> mean = RunningMean()
        >>> mean.update(torch.tensor(1.0), 3)
        >>> mean.update(torch.tensor(2.0), 1)
        >>> mean.compute()
        tensor(1.2500)
    """

    full_state_update = False
    total: Tensor
    count: Tensor

    def __init__(self, sync_on_compute: bool = True, **kwargs: Any) -> None:
        super().__init__(sync_on_compute=sync_on_compute, **kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.get_default_dtype()), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, value: Tensor, n: int) -> None:  # type: ignore[override]
        """Add a batch's mean ``value`` (a scalar tensor) over ``n`` samples."""
        value = value.detach()
        if value.dtype not in (torch.float32, torch.float64):  # half/bf16 sums would lose digits
            value = value.to(torch.get_default_dtype())
        # Out of place, as Lightning does: the state takes the value's device and promoted dtype.
        self.total = self.total + value * n
        self.count = self.count + n

    def compute(self) -> Tensor:
        return self.total / self.count


def stage_metrics(metrics: Metric | MetricCollection | None, stage: str) -> MetricCollection | None:
    """A fresh copy of ``metrics`` for one stage, prefixed ``<stage>/`` (train/val/test never share state).

    >>> from torchmetrics.classification import MulticlassAccuracy
    >>> list(stage_metrics(MulticlassAccuracy(num_classes=3), "val").keys(keep_base=False))
    ['val/MulticlassAccuracy']
    """
    if metrics is None:
        return None
    collection = metrics if isinstance(metrics, MetricCollection) else MetricCollection([metrics])
    return collection.clone(prefix=f"{stage}/")


def step_is_logged(trainer: Any, every: int | None = None, epoch_end: bool = False) -> bool:
    """Whether Lightning writes step-level logs for the optimizer step under way.

    ``every`` overrides the trainer's ``log_every_n_steps`` (a callback's own cadence);
    ``epoch_end`` also counts an epoch's last batch (so the progress bar and ``callback_metrics``
    end the epoch on its final step). The one cadence of the module, the guard and the plot.

    Lightning flushes step logs when the step number plus one is a multiple of
    ``log_every_n_steps`` (and on every step under ``fast_dev_run``); values logged on other
    steps are never written, so they need not be logged at all. (Lightning also flushes on the
    step where a callback stops training early; that row repeats the last logged step values.)
    ``trainer`` may be ``None`` (a module used outside a Trainer): nothing is logged then.

    Example:
        >>> from types import SimpleNamespace
        >>> [step_is_logged(SimpleNamespace(fast_dev_run=False, log_every_n_steps=3, global_step=s)) for s in range(6)]
        [False, False, True, False, False, True]
    """
    if trainer is None:
        return False
    every = every or trainer.log_every_n_steps
    if epoch_end and trainer.is_last_batch:
        return True
    return bool(trainer.fast_dev_run) or (every > 0 and (trainer.global_step + 1) % every == 0)


def epoch_means(load_balancing: bool = False, dropped: bool = False) -> nn.ModuleDict:
    """The running means a :class:`CompositeModule` keeps, keyed ``<stage>_<name>``.

    The training ones are logged per rank, as Lightning did for a training loss logged without
    ``sync_dist`` (a collective per step would cost too much); val/test ones are global means.
    """
    means = {"train_loss": RunningMean(sync_on_compute=False), "val_loss": RunningMean(), "test_loss": RunningMean()}
    if load_balancing:
        means["train_load_balancing"] = RunningMean(sync_on_compute=False)
    if dropped:
        means.update(
            train_dropped=RunningMean(sync_on_compute=False), val_dropped=RunningMean(), test_dropped=RunningMean()
        )
    return nn.ModuleDict(means)


def reset_epoch(means: nn.ModuleDict, stage: str, metrics: MetricCollection | None) -> None:
    """Clear one stage's running means and metrics."""
    for key, mean in means.items():
        if key.startswith(f"{stage}_"):
            mean.reset()
    if metrics is not None:
        metrics.reset()


def log_epoch(module: pl.LightningModule, means: nn.ModuleDict, stage: str, metrics: MetricCollection | None) -> None:
    """Log one stage's epoch values from ``module``'s ``on_<stage>_epoch_end`` hook.

    Keys are those per-step logging gave: ``train/loss_epoch`` (and ``train/loss`` for callbacks
    only, as ``on_step=on_epoch=True`` made both), ``train/load_balancing_epoch`` (and
    ``train/load_balancing``), ``val/loss``, ``test/loss``, ``<stage>/dropped(_epoch)`` with
    capacity routing, and the metrics' own prefixed names.
    They are logged as Metric objects: Lightning computes them after the hook (torchmetrics sums
    their states over ranks in ``compute()``, so no ``sync_dist``), logs and then resets them.
    """
    if not means[f"{stage}_loss"].update_called:
        return  # no step of ours ran (an overridden step, an empty loader): nothing to log
    train = stage == "train"
    for name in ("loss", "load_balancing", "dropped"):
        key = f"{stage}_{name}"
        if key not in means or not means[key].update_called:
            continue
        mean = means[key]
        if train:
            module.log(f"train/{name}_epoch", mean, on_step=False, on_epoch=True, prog_bar=name == "loss")
            module.log(f"train/{name}", mean, on_step=False, on_epoch=True, logger=False)
        else:
            module.log(f"{stage}/{name}", mean, on_step=False, on_epoch=True, prog_bar=True)
    if metrics is not None:
        module.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=not train)
