"""The gradient guard for a pipeline: each rank checks its stage, a cut boundary is named, every rank agrees."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..guard import GradientFlowError, GradientGuard, GuardReport, Problem
from ..guard.sync import gather_problems
from .pipeline import Pipeline
from .pipeline_split import stage_of

_REPLACED = ("detached", "not_in_loss", "unused")  # what a stage's own replay says of a cut at its boundary


class PipelineGuard(GradientGuard):
    """A :class:`GradientGuard` on this rank's pipeline stage(s), one verdict on every rank.

    Each rank checks the parameters it holds (named as in the whole model), against its
    data-parallel copies only (``replica_group``). A pipeline boundary can be cut on either
    side: the sending stage sent its output detached (no gradient can flow back), or the
    receiving stage dropped the gradient of what it received (then zeros are sent back, which
    would look like a gradient). Both are recorded as the tensors cross; every parameter
    upstream of a cut boundary is then reported ``detached`` with the boundary as ``where``:
    "between stage 'mixer' (rank 0) and stage 'proj' (rank 1)". A cut inside a stage is named
    by the stage's own check as in a single process. One small all-reduce over every rank
    decides whether anything is wrong; only then are the problems gathered, so every rank
    raises the same table.

    Args:
        pipeline: this rank's :class:`Pipeline`.
        optimizer: as for :class:`GradientGuard` (the rank's optimizer, over its stage).
        replica_group: the data-parallel copies of this rank's stage (``None``: none).
        **options: the other :class:`GradientGuard` options (``may_skip``, ``check_finite``, ...).

    Example (on every rank, after ``pipeline.step(x, y)``)::

        guard = PipelineGuard(pipeline, optimizer)
        pipeline.step(x, y)
        guard.check()   # raises GradientFlowError on every rank, or none does
    """

    def __init__(
        self,
        pipeline: Pipeline,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        replica_group: Any = None,
        **options: Any,
    ):
        self.pipeline = pipeline
        super().__init__(
            pipeline.module, optimizer, group=replica_group if replica_group is not None else _alone(), **options
        )

    def check(self, raise_error: bool = True, loss: Tensor | None = None) -> GuardReport:
        report = super().check(raise_error=False, loss=loss)
        pipeline = self.pipeline
        cuts = pipeline.boundary_facts()
        n_boundaries = pipeline.n_stages - 1
        flags = torch.zeros(1 + n_boundaries, dtype=torch.uint8)
        flags[0] = int(bool(report.problems))
        for index in cuts:
            flags[1 + index] = 1
        device = torch.device("cpu") if dist.get_backend() == "gloo" else pipeline.device
        flags = flags.to(device)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)  # every rank: pipeline stages and their copies
        flags = flags.cpu()
        if not flags.any():
            return report
        cut = [i for i in range(n_boundaries) if flags[1 + i]]
        seen: list[dict[int, str] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(seen, cuts)  # each side of a boundary knows its half of why
        why: dict[int, str] = {}
        for rank_cuts in seen:
            for index, reason in (rank_cuts or {}).items():
                why.setdefault(index, reason)
        problems = self._boundary_problems(report, cut, why)
        problems = gather_problems(problems)  # every rank of the world: the same table everywhere
        report.problems = problems
        if problems and raise_error:
            raise GradientFlowError(problems)
        return report

    def _boundary_problems(self, report: GuardReport, cut: list[int], why: dict[int, str]) -> list[Problem]:
        """The stage's own problems, with every parameter upstream of a cut boundary named at that boundary."""
        pipeline = self.pipeline
        own = {p.parameter: p for p in report.problems}
        skip = set(report.frozen_names) | set(report.inactive_names)
        problems = [p for p in report.problems if p.parameter not in self.names]  # not_registered and the like
        for name in self.names:
            index = stage_of(pipeline.split, name)
            downstream = [b for b in cut if b >= index]
            mine = own.get(name)
            if not downstream or name in skip or (mine is not None and mine.cause not in _REPLACED):
                if mine is not None:
                    problems.append(mine)
                continue
            boundary = downstream[0]
            where = f"{pipeline.boundary(boundary)}: " + why.get(boundary, "the gradient does not cross it")
            if mine is not None and mine.where:
                where += f"; in stage: {mine.where}"
            problems.append(Problem(name, self.submodels[name], "detached", where))
        return problems


def _alone() -> Any:
    """A process group of this rank alone (every rank takes part in making each one)."""
    mine = None
    for rank in range(dist.get_world_size()):
        group = dist.new_group([rank])
        if rank == dist.get_rank():
            mine = group
    return mine
