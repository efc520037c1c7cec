"""Worker processes for the two-rank gloo DDP tests of the guard (spawned, so importable)."""

from __future__ import annotations

import faulthandler
import json
import os
from pathlib import Path

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


def run(rank: int, world: int, port: int, scenarios: tuple[str, ...], out_dir: str) -> None:
    """Write this rank's verdicts of each scenario to ``out_dir/<scenario>.rank{rank}.json``, then tear down.

    One process group serves every scenario, one after the other (a fresh model and DDP each):
    spawning ranks is most of what a scenario costs. Each file is written from this thread before
    the next scenario, not through a multiprocessing queue: a queue's feeder thread can be starved
    by a C++ destructor that holds the GIL, and the verdict would be lost although the rank
    reached it. DDP is freed while its process group is alive, then the group is destroyed.
    """
    faulthandler.dump_traceback_later(90 * len(scenarios), exit=True)  # a hung rank prints where it hangs, then exits
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for scenario in scenarios:
            outcome = verdicts(scenario)
            path = Path(out_dir) / f"{scenario}.rank{rank}.json"
            path.with_suffix(".tmp").write_text(json.dumps(outcome))
            os.replace(path.with_suffix(".tmp"), path)  # the reader never sees half a file
            dist.barrier()
    finally:
        dist.destroy_process_group()
