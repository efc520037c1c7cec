"""What an exact resume needs beyond Lightning's own checkpoint: random states and the epoch's running sums."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torchmetrics import Metric

from ..packages import check_same_package

if TYPE_CHECKING:
    import pytorch_lightning as pl

KEY = "composites_resume"


def random_states() -> dict[str, Any]:
    """Python's, NumPy's, torch's (and every CUDA device's) random states, as plain values.

    Plain: tensors, ints, strings and tuples only, so ``torch.load(weights_only=True)`` reads them.

    >>> states = random_states(); x = torch.rand(1); set_random_states(states); bool(torch.rand(1) == x)
    True
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states: dict[str, Any]) -> None:
    """Restore what :func:`random_states` returned."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def metric_states(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """The accumulated state of every torchmetrics ``Metric`` in ``module``, by qualified name."""
    return {
        name: {key: value for key, value in m.metric_state.items()}
        for name, m in module.named_modules()
        if isinstance(m, Metric)
    }


def set_metric_states(module: torch.nn.Module, states: dict[str, dict[str, Any]]) -> None:
    """Put back what :func:`metric_states` returned (on each metric's current device)."""
    metrics = dict(module.named_modules())
    for name, state in states.items():
        metric = metrics.get(name)
        if not isinstance(metric, Metric):
            continue
        for key, value in state.items():
            device = metric.device
            moved = [v.to(device) for v in value] if isinstance(value, list) else value.to(device)
            setattr(metric, key, moved)


class ResumeStateBase:
    """Saves the random states and the module's running epoch sums in every checkpoint; restores them on resume.

    Lightning's checkpoint holds the weights, the optimizer, the loops and a stateful data
    loader's position (:class:`ResumableLoader`), but not the random state (dropout, noisy
    routers) nor a torchmetrics ``Metric``'s accumulated state (the epoch's loss sum and
    accuracy counts so far: torchmetrics keeps them out of ``state_dict``). With this callback a
    run resumed from any checkpoint continues as the uninterrupted run would have: the random
    states are put back just before the first batch after the resume, the metric sums too when
    the checkpoint was taken mid-epoch. Under DDP every rank gets rank zero's states.

    The callback is ``composites.training.ResumeState`` (``pytorch_lightning``) or
    ``composites.training.lightning.ResumeState``.

    Example:
        >>> from composites.training import ResumeState
        >>> callback = ResumeState()
        >>> checkpoint = {}
        >>> callback.on_save_checkpoint(None, torch.nn.Linear(1, 1), checkpoint)
        >>> sorted(checkpoint[KEY])
        ['metrics', 'random']
    """

    def __init__(self) -> None:
        self._loaded: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_same_package(self, trainer)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[KEY] = {"random": random_states(), "metrics": metric_states(pl_module)}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._loaded = checkpoint.get(KEY)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._loaded is None:
            return
        loaded, self._loaded = self._loaded, None
        # After the module's own on_train_epoch_start reset: a mid-epoch resume gets the sums back.
        if batch_idx > 0:
            set_metric_states(pl_module, loaded["metrics"])
        set_random_states(loaded["random"])
