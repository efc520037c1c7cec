"""The guard under torch.distributed: one verdict on every rank, from one small collective."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .problems import Problem


def is_distributed(group: Any = None) -> bool:
    """True inside an initialised process group of more than one rank (``group``: that group, else every rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


@dataclass(frozen=True)
class Layout:
    """Where each rank's parameters sit in the union of all ranks' parameter names.

    Under DDP and FSDP every rank holds the same names (``uniform``); under expert parallelism a
    rank holds only its experts, so the flags are laid out over the union, each parameter at its
    name's position, and a parameter only some ranks hold is named with them (``holders``).
    """

    positions: tuple[int, ...]  # local index -> position in the union
    total: int
    uniform: bool
    holders: dict[str, tuple[int, ...]]  # names not held by every rank -> the ranks that hold them


def parameter_layout(names: Sequence[str], group: Any = None) -> Layout:
    """Every rank's parameter names gathered once (a collective: every rank calls it when its guard reads them)."""
    gathered: list[list[str] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(names), group=group)
    union: dict[str, int] = {}
    held: dict[str, list[int]] = {}
    for rank, rank_names in enumerate(gathered):
        for name in rank_names or []:
            union.setdefault(name, len(union))
            held.setdefault(name, []).append(rank)
    world = len(gathered)
    holders = {name: tuple(ranks) for name, ranks in held.items() if len(ranks) < world}
    uniform = all(list(g or []) == list(names) for g in gathered)
    return Layout(tuple(union[n] for n in names), len(union), uniform, holders)


def any_rank(flag: bool, group: Any = None) -> bool:
    """True on every rank when ``flag`` is True on some rank (one tiny all-reduce)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    value = torch.tensor([int(flag)], dtype=torch.uint8, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value)


def reduce_flags(
    params: Sequence[nn.Parameter],
    reached: set[int],
    missing: set[int],
    non_finite: bool,
    anywhere: set[int] | None = None,
    layout: Layout | None = None,
    group: Any = None,
) -> tuple[set[int], bool, bool]:
    """Combine every rank's view with a single MAX all-reduce.

    A parameter is fine when any rank reached it (that is what DDP's gradient all-reduce
    gives); it is a problem when no rank reached it and some rank had no excuse (a routed-out
    branch is an excuse). Every rank gets the same answer, so all raise together or none does.
    Returns ``(flagged here, non-finite anywhere, flagged anywhere)``.
    When given, ``anywhere`` is filled with the parameters some rank reached (what starvation counts).
    With a ``layout`` (ranks holding different parameters), each flag sits at its name's position
    in the union; the result still holds this rank's indices only. ``group``: the ranks that
    hold these same parameters (default: every rank).
    """
    n = len(params) if layout is None else layout.total

    def at(indices: set[int]) -> list[int]:  # this rank's indices -> positions in the flags
        return list(indices) if layout is None else [layout.positions[i] for i in indices]

    device = params[0].device if params else torch.device("cpu")
    if dist.get_backend(group) == "gloo":
        device = torch.device("cpu")
    flags = torch.zeros(2 * n + 1, dtype=torch.uint8)
    if reached:
        flags[at(reached)] = 1
    if missing:
        flags[[n + i for i in at(missing)]] = 1
    flags[2 * n] = int(non_finite)
    flags = flags.to(device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    flags = flags.cpu()
    reached_somewhere = flags[:n].bool()
    flagged = flags[n : 2 * n].bool() & ~reached_somewhere
    # flagged_anywhere: a parameter only another rank holds may be the problem; every rank must know
    flagged_anywhere = bool(flagged.any())
    if layout is not None:  # back to this rank's indices
        index = torch.tensor(layout.positions, dtype=torch.long)
        reached_somewhere, flagged = reached_somewhere[index], flagged[index]
    if anywhere is not None:
        anywhere.update(reached_somewhere.nonzero().flatten().tolist())
    return set(flagged.nonzero().flatten().tolist()), bool(flags[2 * n]), flagged_anywhere


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


def with_holders(problems: list[Problem], layout: Layout) -> list[Problem]:
    """Each problem of a parameter only some ranks hold (an expert) says which: ``(on rank 1)``."""
    named = []
    for p in problems:
        ranks = layout.holders.get(p.parameter)
        if ranks:
            held = f"on rank {ranks[0]}" if len(ranks) == 1 else f"on ranks {', '.join(map(str, ranks))}"
            p = replace(p, where=f"{p.where} ({held})" if p.where else held)
        named.append(p)
    return named


class RankAgreement:
    """The guard's collectives: one verdict on every rank, also where ranks hold different parameters.

    Under DDP and FSDP every rank holds the same parameters. Under expert parallelism a rank
    holds only its experts (``spread``): the flags are laid out over the union of names, what
    only one rank holds can fail there alone (so the ranks agree on whether to diagnose), and a
    problem of such a parameter names its rank. ``group``: the ranks that hold these same
    parameters or their experts (default: every rank).
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.layout: Layout | None = None  # every rank's names, gathered at the first distributed check

    def forget(self) -> None:
        """The parameters were read again: gather the names at the next check."""
        self.layout = None

    @property
    def spread(self) -> bool:
        """Ranks hold different parameters (expert parallelism), in a live process group."""
        return self.layout is not None and not self.layout.uniform and is_distributed(self.group)

    def reduce(
        self, guard: Any, reached: set[int], missing: set[int], non_finite: bool
    ) -> tuple[set[int], bool, bool, set[int]]:
        """:func:`reduce_flags` over ``guard.params`` (their names' layout gathered once), with what
        it fills in: ``(flagged here, non-finite anywhere, flagged anywhere, reached anywhere)``."""
        if self.layout is None:
            self.layout = parameter_layout(guard.names, self.group)
        anywhere: set[int] = set()
        flagged, non_finite, elsewhere = reduce_flags(
            guard.params, reached, missing, non_finite, anywhere, self.layout if self.spread else None, self.group
        )
        return flagged, non_finite, elsewhere, anywhere

    def agree(self, trouble: bool) -> bool:
        """Whether some rank found trouble (every rank calls it; a collective only when ``spread``)."""
        return any_rank(trouble, self.group) if self.spread else trouble

    def problems(self, problems: list[Problem]) -> list[Problem]:
        """Every rank's problems merged, each parameter only some ranks hold named with them."""
        merged = gather_problems(problems, self.group)
        return with_holders(merged, self.layout) if self.spread else merged
