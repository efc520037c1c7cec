"""The process groups of expert parallelism: who shares a copy of the experts, who holds the same ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class ExpertGroups:
    """The process groups of expert parallelism.

    Ranks ``[i * ep_size, (i + 1) * ep_size)`` form expert-parallel group ``i``: together they
    hold every expert once. Ranks with the same position in their group hold the same experts
    and form a replica group (``None`` when the expert-parallel group spans all ranks).

    Example:
        >>> ExpertGroups(4, 2, 1, None, 2, None, None).replica_size  # rank 3 of 4: second of its pair, two copies
        2
    """

    world_size: int
    ep_size: int
    ep_rank: int
    ep_group: Any
    replica_size: int
    replica_group: Any
    world_group: Any


def expert_groups(ep_size: int | None = None) -> ExpertGroups:
    """Make the expert-parallel and replica process groups (every rank calls it, in the same order).

    Args:
        ep_size: ranks that share one copy of the experts (``None``: all ranks). Must divide the
            world size.

    Example:
        >>> import os, tempfile
        >>> store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        >>> groups = expert_groups()
        >>> groups.ep_size, groups.ep_rank, groups.replica_size, groups.replica_group
        (1, 0, 1, None)
        >>> dist.destroy_process_group()
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process group")
    world, rank = dist.get_world_size(), dist.get_rank()
    size = world if ep_size is None else ep_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world % size:
        raise ValueError(
            f"expert_parallel_size={ep_size!r} must be a positive number of ranks dividing the world size {world} "
            f"(one of {[d for d in range(1, world + 1) if world % d == 0]}), or null for all ranks"
        )
    # new_group is collective over the whole world: every rank makes every group, in one order
    ep_group = replica_group = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            ep_group = group
    replicas = world // size
    if replicas > 1:
        for first in range(size):
            group = dist.new_group(list(range(first, world, size)))
            if rank % size == first:
                replica_group = group
    world_group = dist.new_group(list(range(world)))  # its own communicator: never interleaves with DDP's
    return ExpertGroups(world, size, rank % size, ep_group, replicas, replica_group, world_group)
