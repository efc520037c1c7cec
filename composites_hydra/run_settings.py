"""Settings that run but waste or mislead the run: more processes than cores, a checkpoint mode against
its metric, nothing trained or validated. Warned, or refused when the run would keep the wrong model."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError


def check_run_settings(cfg: DictConfig) -> None:
    """All of this module's checks on a composed config.

    >>> check_run_settings(OmegaConf.create({"monitor": "val/loss", "monitor_mode": "max"}))
    Traceback (most recent call last):
    ...
    composites_hydra.errors.ConfigError: monitor_mode=max contradicts monitor=val/loss: a loss or error is best low, so mode max would keep and test the worst checkpoint. Drop monitor_mode (null follows the metric: min) or set monitor_mode=min. If val/loss really is best high, set the checkpoint's own mode instead: callbacks.checkpoint.mode=max
    """
    _check_processes(OmegaConf.select(cfg, "trainer") or {})
    _check_monitor_mode(cfg)
    _check_training_happens(cfg)


def _check_processes(trainer: Any) -> None:
    """Warn when a CPU run starts more processes than the machine has cores, whatever starts them.

    Lightning starts one process per device for any multi-device strategy (``ddp``, ``ddp_spawn``,
    ``fsdp``, ``auto`` with ``devices>1``, a ``_target_`` strategy), not only for one named ddp.
    """
    devices, cores = trainer.get("devices"), os.cpu_count() or 1
    count = len(devices) if isinstance(devices, Sequence) and not isinstance(devices, str) else devices
    if isinstance(count, str) and count.strip().isdigit():
        count = int(count)
    accelerator = str(trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not _has_accelerator())
    if on_cpu and isinstance(count, int) and not isinstance(count, bool) and count > cores:
        strategy = trainer.get("strategy", "auto")
        strategy = strategy.get("_target_", strategy) if isinstance(strategy, Mapping) else strategy
        warnings.warn(
            f"trainer.devices={devices} starts {count} CPU processes (strategy {strategy}) on {cores} cores: they share "
            f"the cores, so each step runs slower than with {cores} processes; use trainer.devices<={cores}",
            stacklevel=4,
        )


def _check_training_happens(cfg: DictConfig) -> None:
    """Warn when the settings leave nothing to train, or no validation to pick the best checkpoint by."""
    epochs = OmegaConf.select(cfg, "trainer.max_epochs")
    if epochs == 0 and OmegaConf.select(cfg, "trainer.max_steps", default=-1) in (-1, None):
        warnings.warn(
            "trainer.max_epochs=0 trains nothing: fit returns at once and the test runs on the untrained "
            "(or resumed) weights; set trainer.max_epochs>=1",
            stacklevel=4,
        )
    monitor = str(OmegaConf.select(cfg, "monitor") or "")
    every = OmegaConf.select(cfg, "trainer.check_val_every_n_epoch")
    limit = OmegaConf.select(cfg, "trainer.limit_val_batches")
    never = None
    if limit == 0:
        never = "trainer.limit_val_batches=0 turns validation off"
    elif isinstance(every, int) and isinstance(epochs, int) and 0 < epochs < every:
        never = (
            f"trainer.check_val_every_n_epoch={every} is more than trainer.max_epochs={epochs}, so no validation runs"
        )
    if never and monitor.startswith("val/"):
        warnings.warn(
            f"{never}: monitor={monitor} is never logged, so no best checkpoint is kept and the test runs on the last "
            "weights; validate at least once, or monitor a train/ metric",
            stacklevel=4,
        )
    top_k = OmegaConf.select(cfg, "callbacks.checkpoint.save_top_k", default=None)
    if top_k == 0:
        warnings.warn(
            "callbacks.checkpoint.save_top_k=0 keeps no best checkpoint: the test runs on the last epoch's weights, "
            "not the best; set save_top_k>=1, or drop the callback (~callbacks.checkpoint) to say so",
            stacklevel=4,
        )


def _has_accelerator() -> bool:
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


# Words in a metric's name that say which way it is best (split at / _ - .): a loss is best low, a score high.
LOWER_IS_BETTER = {"loss", "nll", "error", "err", "mse", "mae", "rmse", "perplexity", "ppl", "wer", "cer"}
HIGHER_IS_BETTER = {"acc", "accuracy", "f1", "auroc", "auc", "ap", "map", "precision", "recall", "iou", "dice", "r2"}


def metric_direction(name: str) -> str | None:
    """``"min"`` or ``"max"`` when the metric's name says how it is best, else ``None``.

    >>> metric_direction("val/loss"), metric_direction("val/acc"), metric_direction("train/f1_epoch"), metric_direction("val/x")
    ('min', 'max', 'max', None)
    """
    words = set(re.split(r"[/_.\-]", name.lower()))
    low, high = bool(words & LOWER_IS_BETTER), bool(words & HIGHER_IS_BETTER)
    return None if low == high else ("min" if low else "max")


def _check_monitor_mode(cfg: DictConfig) -> None:
    """Refuse a ``monitor_mode`` that keeps the worst checkpoint of a metric whose direction is known."""
    monitor, mode = OmegaConf.select(cfg, "monitor"), OmegaConf.select(cfg, "monitor_mode")
    mode = getattr(mode, "value", mode)  # the schema's enum
    direction = metric_direction(str(monitor)) if monitor else None
    if mode is None or direction is None or mode == direction:
        return
    kind = "a loss or error is best low" if direction == "min" else "a score is best high"
    raise ConfigError(
        f"monitor_mode={mode} contradicts monitor={monitor}: {kind}, so mode {mode} would keep and test the worst "
        f"checkpoint. Drop monitor_mode (null follows the metric: {direction}) or set monitor_mode={direction}. "
        f"If {monitor} really is best {'high' if mode == 'max' else 'low'}, set the checkpoint's own mode instead: "
        f"callbacks.checkpoint.mode={mode}"
    )
