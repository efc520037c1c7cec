"""Torch-level parallelism for composites (no Lightning): a Sequential as a pipeline over ranks."""

from .pipeline import SCHEDULES, Pipeline, PipelineStageModule
from .pipeline_split import balanced_split, check_split

__all__ = ["SCHEDULES", "Pipeline", "PipelineStageModule", "balanced_split", "check_split"]
