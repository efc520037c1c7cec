"""The shapes a scheduler may come in (a partial, a Lightning dict, a dict of a partial) -> what Lightning takes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch


def configure_schedule(optimizer: torch.optim.Optimizer, factory: Callable[..., Any] | Mapping | None) -> Any:
    """The return value of ``configure_optimizers`` for ``optimizer`` and a scheduler ``factory``.

    ``factory``: ``None`` (no scheduler); a partial taking the optimizer and returning an LR
    scheduler (stepped each epoch; a ``ReduceLROnPlateau`` watches ``val/loss``) or a Lightning
    scheduler dict; or a Lightning scheduler dict whose ``"scheduler"`` is such a partial (what
    YAML can say: ``{scheduler: {_target_: ..., _partial_: true}, interval: step}``).

    Example:
        >>> from functools import partial
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
        >>> config = configure_schedule(opt, partial(torch.optim.lr_scheduler.StepLR, step_size=2))
        >>> type(config["lr_scheduler"]["scheduler"]).__name__, config["lr_scheduler"]["interval"]
        ('StepLR', 'epoch')
    """
    if factory is None:
        return optimizer
    if isinstance(factory, Mapping):  # a Lightning scheduler dict from YAML: {scheduler: <partial>, interval: step}
        if not callable(factory.get("scheduler")):
            raise TypeError(
                "scheduler: a mapping needs a 'scheduler' entry that is a partial taking the optimizer "
                "(_partial_: true), plus Lightning's keys (interval, frequency, monitor)"
            )
        return {"optimizer": optimizer, "lr_scheduler": {**factory, "scheduler": factory["scheduler"](optimizer)}}
    if not callable(factory):
        raise TypeError(
            f"scheduler must be a partial taking the optimizer (_partial_: true) or a Lightning "
            f"scheduler mapping, got {type(factory).__name__}"
        )
    scheduler = factory(optimizer)
    if isinstance(scheduler, Mapping):
        return {"optimizer": optimizer, "lr_scheduler": dict(scheduler)}
    config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        config["monitor"] = "val/loss"
    return {"optimizer": optimizer, "lr_scheduler": config}
