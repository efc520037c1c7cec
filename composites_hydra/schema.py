"""Structured-config schema of configs/train.yaml: typos and wrong types in framework keys fail at compose time.

Hydra merges every YAML file of the run into these dataclasses, so ``seedd=1``,
``guard=rase``, ``seed=abc`` or ``trainer.max_epoch=3`` stop with an error naming the key
before anything is built. The user's own objects (model, data, module, optimizer, ...)
stay free-form ``_target_`` nodes. The library (``composites/``) never sees this module:
Hydra lives at the edge.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from composites.training import GuardMode  # the one list of guard modes (composites.training.GUARD_MODES)

MonitorMode = Enum("MonitorMode", [(m, m) for m in ("min", "max")], type=str)

# Trainer arguments that arrive as objects from other groups, not as YAML values.
_FROM_OTHER_GROUPS = {"self", "logger", "callbacks", "plugins"}
_SIMPLE = {int, float, bool, str} | {Optional[t] for t in (int, float, bool, str)}  # noqa: UP045 (OmegaConf reads typing.Optional)


def _trainer_schema() -> type:
    """One field per ``pytorch_lightning.Trainer`` argument, with Lightning's own default.

    Read from the installed Lightning, so the schema never drifts from it: an unknown key is
    an error and simple-typed keys (``max_epochs: Optional[int]``, ...) are type-checked;
    union-typed ones (``devices``, ``precision``, ...) accept any value and Lightning checks them.
    """
    from pytorch_lightning import Trainer

    try:
        hints = typing.get_type_hints(Trainer.__init__)
    except Exception:  # an annotation this Python cannot resolve: fall back to Any everywhere
        hints = {}
    fields: list[tuple[str, Any, Any]] = [("_target_", str, field(default="pytorch_lightning.Trainer"))]
    for name, p in inspect.signature(Trainer.__init__).parameters.items():
        default = p.default
        if name in _FROM_OTHER_GROUPS or not isinstance(default, (type(None), bool, int, float, str)):
            continue
        kind = hints.get(name, Any)
        fields.append((name, kind if kind in _SIMPLE else Any, field(default=default)))
    return dataclasses.make_dataclass("TrainerConfig", fields)


TrainerConfig = _trainer_schema()


@dataclass
class PathsConfig:
    output_dir: str = MISSING  # the run directory (checkpoints, logs); Hydra's output dir by default


@dataclass
class TrainConfig:
    """Top-level keys of a training run (see configs/train.yaml for what each does)."""

    seed: int = 0
    guard: GuardMode = GuardMode["raise"]
    monitor: str = "val/acc"
    monitor_mode: MonitorMode | None = None  # None: min for a loss, max otherwise
    ckpt_path: str | None = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # type: ignore[valid-type]
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: Any = MISSING
    data: Any = MISSING
    module: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = None
    callbacks: Any = field(default_factory=dict)
    logger: Any = None
    compile: Any = False  # false | true | a mapping of torch.compile arguments, e.g. {backend: eager}


def register_configs() -> None:
    """Register the schema as ``train_schema`` (train.yaml lists it first in its defaults).

    >>> register_configs()
    >>> "train_schema.yaml" in ConfigStore.instance().list("")
    True
    """
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
