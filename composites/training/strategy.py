"""Make a Lightning strategy fit the model: routing under DDP and FSDP2, and the FSDP2 preset's strategy."""

from __future__ import annotations

from collections.abc import Generator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

from ..modules import Conditional
from .sharding import Policy, shard_composite


def _routed(model: nn.Module) -> str:
    where = [f"'{p}'" if p else "the model" for p, m in model.named_modules() if isinstance(m, Conditional)]
    return ", ".join(where)


def prepare_strategy(strategy: object, model: nn.Module, guard_on: bool) -> str | None:
    """Adjust ``strategy`` for ``model`` before Lightning wraps it; return what was chosen and why.

    A :class:`Conditional` leaves branches unused on a rank, which plain DDP answers with
    "Expected to have finished reduction" (unused on every rank) or a hang (unused on some).
    So with a Conditional anywhere in the model, DDP is switched to
    ``find_unused_parameters=True``. FSDP1 (``FSDPStrategy``) flattens parameters, which the
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
    from .flavours import lightning_api, package_of  # the strategy's own Lightning package (lightning or pl)

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
    if not _routed(model) or kwargs.get("find_unused_parameters"):
        return None
    kwargs["find_unused_parameters"] = True
    return (
        f"DDP: find_unused_parameters=True, because the Conditional {_routed(model)} routes samples to a subset "
        "of its branches, so a rank can leave a branch unused"
    )


def configure_sharding(strategy: object, model: nn.Module, may_skip: Sequence[str] = ()) -> str | None:
    """Shard ``model`` with FSDP2 when ``strategy`` is a ``ModelParallelStrategy``; return what was chosen and why.

    Called from ``LightningModule.configure_model``: one unit per sub-model (the strategy's
    ``policy``, :func:`~composites.training.sharding.composite_units` by default), then the
    root, with the strategy's mixed precision. When a rank can leave parameters unused (a
    ``Conditional``, ``may_skip`` patterns), ``set_reduce_scatter_unused_params(True)``: such a
    rank reduce-scatters zeros for them, so every rank runs the same collectives.

    Example:
        >>> configure_sharding(object(), nn.Linear(2, 2)) is None  # any other strategy: nothing to do
        True
    """
    if not isinstance(strategy, ModelParallelStrategy):
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


_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_DTYPES |= {"fp32": torch.float32, "float32": torch.float32}


def _dtype(name: str | None, key: str) -> torch.dtype | None:
    if name is None:
        return None
    if str(name) not in _DTYPES:
        raise ValueError(f"trainer.strategy.{key}={name!r}: use one of {', '.join(_DTYPES)} or null")
    return _DTYPES[str(name)]


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2 over every rank, for ``CompositeModule``.

    Data parallel over all ``num_nodes * devices`` ranks (no tensor parallelism) unless the
    sizes are given; the module's ``configure_model`` shards each sub-model as its own unit
    (:func:`configure_sharding`); with gradient accumulation, the micro-batches that do not
    step skip the reduce-scatter (``set_requires_gradient_sync(False)``).

    Args:
        policy: which sub-models become units: ``None`` (stages, branches, a Conditional's
            branches together), a list of glob patterns over module paths, or a callable.
        param_dtype: ``"bf16"``/``"fp16"``: gathered parameters and compute in that dtype
            (FSDP2 mixed precision; the sharded master weights stay float32); ``None``: float32.
        reduce_dtype: dtype of the gradient reduce-scatter (float32 by default).
        reshard_after_forward: free gathered parameters after each unit's forward.
        **kwargs: ``ModelParallelStrategy`` arguments (``save_distributed_checkpoint``, ...).

    Example:
        >>> strategy = FSDP2Strategy(param_dtype="bf16")
        >>> strategy.mp_policy.param_dtype, strategy.mp_policy.reduce_dtype
        (torch.bfloat16, torch.float32)
    """

    def __init__(
        self,
        policy: Policy | Sequence[str] | None = None,
        param_dtype: str | None = None,
        reduce_dtype: str | None = "float32",
        reshard_after_forward: bool = True,
        **kwargs: Any,
    ):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        super().__init__(**kwargs)
        self.policy = list(policy) if policy is not None and not callable(policy) else policy
        param = _dtype(param_dtype, "param_dtype")
        self.mp_policy = MixedPrecisionPolicy(
            param_dtype=param,
            reduce_dtype=_dtype(reduce_dtype, "reduce_dtype"),
            output_dtype=torch.float32 if param is not None else None,  # the loss in float32
        )
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == "auto":
            self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in self.lightning_module.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_requires_gradient_sync(False, recurse=False)
        try:
            yield None
        finally:
            for unit in units:
                unit.set_requires_gradient_sync(True, recurse=False)
