"""Torch-level parallelism for composites (no Lightning): a Conditional's experts spread over ranks,
a Sequential as a pipeline over ranks."""

from .expert_dispatch import ExpertDispatch
from .expert_groups import ExpertGroups, expert_groups
from .expert_parallel import ExpertParallel, shard_experts
from .pipeline import SCHEDULES, Pipeline, PipelineStageModule
from .pipeline_split import balanced_split, check_split

__all__ = [
    "ExpertDispatch",
    "ExpertGroups",
    "ExpertParallel",
    "SCHEDULES",
    "Pipeline",
    "PipelineStageModule",
    "balanced_split",
    "check_split",
    "expert_groups",
    "shard_experts",
]
