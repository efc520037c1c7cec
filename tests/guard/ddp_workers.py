"""The two-rank gloo DDP scenarios of the guard, run by ``tests.gloo_ranks``'s spawned ranks (so importable).

Each scenario builds a fresh model and DDP; every DDP object dies with its frame, while the
scenario's process group is alive.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from composites import Conditional, GradientFlowError, GradientGuard
from tests.guard.buggy_models import Detaching, linear


class RankRouted(nn.Module):
    """Branch 'a' on rank 0, branch 'b' on rank 1: each branch is active on one rank only."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = linear(3, 3)
        self.experts = Conditional(
            {"a": linear(3, 2), "b": linear(3, 2), "c": linear(3, 2)}, router=lambda x: "ab"[dist.get_rank()]
        )
        self.aux = linear(3, 2)
        self.use_aux = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        out = self.experts(h)
        return out + self.aux(h) if self.use_aux else out


def verdicts(scenario: str) -> list:
    """What the guard says on this rank over three steps; every DDP object dies with this frame."""
    model = RankRouted()
    if scenario == "unused_everywhere":
        model.use_aux = False
    if scenario == "detached_where_routed":  # 'b' runs (and cuts) on rank 1 only; rank 0 routes it out
        model.experts = Conditional(
            {"a": linear(3, 2), "b": Detaching(width=2), "c": linear(3, 2)}, router=lambda x: "ab"[dist.get_rank()]
        )
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    guard = GradientGuard(model)
    outcome = []
    for _ in range(3):
        ddp(torch.ones(4, 3)).sum().backward()
        try:
            report = guard.check()
            outcome.append(["ok", report.inactive_names])
        except GradientFlowError as error:
            outcome.append(["error", [[p.parameter, p.module, p.cause] for p in error.problems]])
            break
    return outcome
