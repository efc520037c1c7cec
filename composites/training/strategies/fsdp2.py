"""FSDP2 through Lightning: the ``trainer=fsdp`` preset's strategy, written once for both Lightning packages.

The strategies are ``composites.training.FSDP2Strategy`` (``pytorch_lightning``) and
``composites.training.lightning.FSDP2Strategy``: each is :class:`FSDP2StrategyBase` and its package's
``ModelParallelStrategy``.
"""

from __future__ import annotations

import warnings
from collections.abc import Generator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .sharding import Policy

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_DTYPES |= {"fp32": torch.float32, "float32": torch.float32}


def _dtype(name: str | None, key: str) -> torch.dtype | None:
    if name is None:
        return None
    if str(name) not in _DTYPES:
        raise ValueError(f"trainer.strategy.{key}={name!r}: use one of {', '.join(_DTYPES)} or null")
    return _DTYPES[str(name)]


class FSDP2StrategyBase:
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
        >>> from composites.training import FSDP2Strategy
        >>> strategy = FSDP2Strategy(param_dtype="bf16")  # pytorch_lightning's ModelParallelStrategy
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
        # A sharded checkpoint folder (last.ckpt every epoch) is rewritten on purpose: torch's warning on
        # each save that it overwrites one says nothing the run did not choose.
        warnings.filterwarnings("ignore", message=r"Detected an existing checkpoint in .*, overwriting since")
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
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
