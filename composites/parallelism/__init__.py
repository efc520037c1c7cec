"""Torch-level parallelism for composites (no Lightning): experts of a Conditional spread over ranks."""

from .expert_dispatch import ExpertDispatch
from .expert_groups import ExpertGroups, expert_groups
from .expert_parallel import ExpertParallel, shard_experts

__all__ = ["ExpertDispatch", "ExpertGroups", "ExpertParallel", "expert_groups", "shard_experts"]
