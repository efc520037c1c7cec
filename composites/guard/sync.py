"""The guard under torch.distributed: one verdict on every rank, from one small collective."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .problems import Problem


def is_distributed(group: Any = None) -> bool:
    """True inside an initialised process group of more than one rank (``group``: that group, else every rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def reduce_flags(
    params: Sequence[nn.Parameter],
    reached: set[int],
    missing: set[int],
    non_finite: bool,
    anywhere: set[int] | None = None,
    group: Any = None,
) -> tuple[set[int], bool]:
    """Combine every rank's view with a single MAX all-reduce.

    A parameter is fine when any rank reached it (that is what DDP's gradient all-reduce
    gives); it is a problem when no rank reached it and some rank had no excuse (a routed-out
    branch is an excuse). Every rank gets the same answer, so all raise together or none does.
    When given, ``anywhere`` is filled with the parameters some rank reached (what starvation counts).
    ``group``: the ranks that hold these same parameters (default: every rank).
    """
    n = len(params)
    device = params[0].device if n else torch.device("cpu")
    if dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    flags = torch.zeros(2 * n + 1, dtype=torch.uint8)
    if reached:
        flags[list(reached)] = 1
    if missing:
        flags[[n + i for i in missing]] = 1
    flags[2 * n] = int(non_finite)
    flags = flags.to(device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    flags = flags.cpu()
    reached_somewhere = flags[:n].bool()
    flagged = flags[n : 2 * n].bool() & ~reached_somewhere
    if anywhere is not None:
        anywhere.update(reached_somewhere.nonzero().flatten().tolist())
    return set(flagged.nonzero().flatten().tolist()), bool(flags[2 * n])


def gather_problems(problems: list[Problem], group: Any = None) -> list[Problem]:
    """Every rank's diagnosis merged, so every rank raises the same error (failure path only)."""
    gathered: list[list[Problem] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, problems, group=group)
    # one line per parameter: the lowest rank's diagnosis wins (a rank diagnoses only what it
    # missed itself, so one that routed a branch out has no say on why the branch got nothing)
    by_param: dict[str, Problem] = {}
    for rank_problems in gathered:
        for p in rank_problems or []:
            by_param.setdefault(p.parameter, p)
    return sorted(by_param.values(), key=lambda p: p.parameter)
