"""DTensor helpers (FSDP2 shards): this rank's part of a tensor, whether a tensor is sharded, whole gradient norms.

A leaf of the guard: the guard's structure (norms), its sharded checks and its overflow check all use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .finite import stored

try:  # FSDP2 and DTensor: absent from some builds (no torch.distributed)
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    FSDPModule = DTensor = None  # type: ignore[assignment,misc]


def local(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor``: the local shard of a ``DTensor``, any other tensor as it is.

    Example:
        >>> local(torch.ones(2)).tolist()
        [1.0, 1.0]
    """
    return tensor.to_local() if DTensor is not None and isinstance(tensor, DTensor) else tensor


def is_sharded(tensor: Tensor | None) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a parameter or gradient FSDP2 sharded).

    Example:
        >>> is_sharded(torch.ones(1)), is_sharded(None)
        (False, False)
    """
    return DTensor is not None and isinstance(tensor, DTensor)


def whole_grad_norms(
    named: Iterable[tuple[str, nn.Parameter]], owners: Mapping[str, str], root: str = "(model)"
) -> dict[str, float]:
    """L2 norm of each sub-model's WHOLE gradient when gradients are sharded: local squared sums, one SUM
    all-reduce over the ranks. Every rank must call it (Lightning's hooks run on every rank); all get the
    same values. Sub-models are named as in :func:`~composites.guard.grouped_grad_norms` (``root``: the model).
    """
    named = list(named)
    keys = sorted({owners[name] or root for name, _ in named})  # the same on every rank
    position = {k: j for j, k in enumerate(keys)}
    device = next((p.grad.device for _, p in named if p.grad is not None), torch.device("cpu"))
    if dist.get_backend() == "gloo":
        device = torch.device("cpu")
    totals = torch.zeros(2 * len(keys), device=device)  # squared sums, then "held a gradient" flags
    for name, p in named:
        if p.grad is not None:
            j = position[owners[name] or root]
            totals[j] += stored(local(p.grad.detach())).float().pow(2).sum().to(device)
            totals[len(keys) + j] = 1
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    norms, held = totals[: len(keys)].sqrt().tolist(), totals[len(keys) :].tolist()
    return {k: norm for k, norm, h in zip(keys, norms, held) if h}
