"""Torch-level parallelism for composites (no Lightning): experts of a Conditional spread over ranks."""

from .expert_parallel import ExpertDispatch, ExpertGroups, ExpertParallel, expert_groups, shard_experts

__all__ = ["ExpertDispatch", "ExpertGroups", "ExpertParallel", "expert_groups", "shard_experts"]
