"""Make a Lightning strategy fit the model: routing under DDP, one FSDP2 unit per sub-model."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from ...modules import Conditional
from ..packages import lightning_api, package_of
from .sharding import shard_composite


def _routed(model: nn.Module) -> str:
    where = [f"'{p}'" if p else "the model" for p, m in model.named_modules() if isinstance(m, Conditional)]
    return ", ".join(where)


def prepare_strategy(strategy: object, model: nn.Module, guard_on: bool, may_skip: Sequence[str] = ()) -> str | None:
    """Adjust ``strategy`` for ``model`` before Lightning wraps it; return what was chosen and why.

    A :class:`Conditional` leaves branches unused on a rank, which plain DDP answers with
    "Expected to have finished reduction" (unused on every rank) or a hang (unused on some).
    So with a Conditional anywhere in the model, or ``may_skip`` patterns (parameters the model's
    own routing may leave without a gradient), DDP is switched to ``find_unused_parameters=True``. FSDP1 (``FSDPStrategy``) flattens parameters, which the
    guard cannot check per parameter: with the guard on it points to ``trainer=fsdp`` (FSDP2).

    Example:
        >>> from pytorch_lightning.strategies import DDPStrategy
        >>> from torch import nn
        >>> strategy = DDPStrategy()
        >>> model = Conditional({"a": nn.Identity(), "b": nn.Identity()}, router=None)
        >>> print(prepare_strategy(strategy, model, guard_on=True))
        DDP: find_unused_parameters=True, because the Conditional the model routes samples to a subset of its branches, so a rank can leave a branch unused
        >>> strategy._ddp_kwargs["find_unused_parameters"]
        True
    """
    strategies = lightning_api(package_of(strategy) or "pytorch_lightning").strategies
    DDPStrategy, FSDPStrategy = strategies.DDPStrategy, strategies.FSDPStrategy

    if isinstance(strategy, FSDPStrategy) and guard_on:
        raise RuntimeError(
            "trainer.strategy: FSDP1 (FSDPStrategy) flattens parameters, so the gradient guard cannot check them: "
            "use trainer=fsdp (FSDP2, sharded per parameter, guarded), or turn the guard off with guard=off"
        )
    if not isinstance(strategy, DDPStrategy):
        return None
    kwargs = strategy._ddp_kwargs  # read by DDPStrategy when it wraps the model in strategy.setup()
    if not (_routed(model) or may_skip) or kwargs.get("find_unused_parameters"):
        return None
    kwargs["find_unused_parameters"] = True
    # chosen knowingly: a step where every rank ran every branch is expected, not a misconfiguration
    warnings.filterwarnings(
        "ignore", message=r"find_unused_parameters=True was specified in DDP constructor, but did not"
    )
    if not _routed(model):
        return (
            f"DDP: find_unused_parameters=True, because may_skip {list(may_skip)} can leave parameters unused on a rank"
        )
    return (
        f"DDP: find_unused_parameters=True, because the Conditional {_routed(model)} routes samples to a subset "
        "of its branches, so a rank can leave a branch unused"
    )


def configure_sharding(strategy: object, model: nn.Module, may_skip: Sequence[str] = ()) -> str | None:
    """Shard ``model`` with FSDP2 when ``strategy`` is a ``ModelParallelStrategy``; return what was chosen and why.

    Called from ``LightningModule.configure_model``: one unit per sub-model (the strategy's
    ``policy``, :func:`~composites.training.strategies.sharding.composite_units` by default), then the
    root, with the strategy's mixed precision. When a rank can leave parameters unused (a
    ``Conditional``, ``may_skip`` patterns), ``set_reduce_scatter_unused_params(True)``: such a
    rank reduce-scatters zeros for them, so every rank runs the same collectives.

    Example:
        >>> configure_sharding(object(), nn.Linear(2, 2)) is None  # any other strategy: nothing to do
        True
    """
    package = package_of(strategy)
    if package is None or not isinstance(strategy, lightning_api(package).strategies.ModelParallelStrategy):
        return None
    policy = getattr(strategy, "policy", None)
    mp = getattr(strategy, "mp_policy", None)
    reshard = getattr(strategy, "reshard_after_forward", True)
    mesh = strategy.device_mesh["data_parallel"]
    units = shard_composite(model, mesh, policy, mp, reshard, may_skip)
    if units is None:  # sharded already (configure_model runs again for trainer.test)
        return None
    why = [f"the Conditional {_routed(model)}"] if _routed(model) else []
    why += [f"may_skip {list(may_skip)}"] if may_skip else []
    if why:
        model.set_reduce_scatter_unused_params(True)
    listed = "".join("+".join(group) + ", " for group in units)
    summary = f"FSDP2: {len(units) + 1} units ({listed}then the root)"
    if why:
        summary += (
            f"; set_reduce_scatter_unused_params(True), because {' and '.join(why)} can leave parameters unused "
            "on a rank, which then reduce-scatters zeros for them so every rank runs the same collectives"
        )
    return summary


def cpu_state(state: Any) -> Any:
    """A nested state (an optimizer's ``state_dict``) with its tensors on the CPU, to gather over ranks.

    Gathered objects unpickle on the device they were sent from; on the CPU every rank can read them.

    >>> import torch
    >>> cpu_state({"state": {0: {"step": torch.tensor(3.0)}}, "groups": [1]})["state"][0]["step"].device
    device(type='cpu')
    """
    from lightning_fabric.utilities.apply_func import move_data_to_device  # Lightning: imported when used

    return move_data_to_device(state, "cpu")
