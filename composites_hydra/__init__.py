"""The Hydra edge of composites: the config schema and the instantiation chain of scripts/train.py.

It lives apart from ``composites`` (which never imports Hydra) and is installed with it, so a
job that unpickles a config on a cluster node (Hydra's submitit launcher) can import the schema.
"""

from .build import available_composites, build, build_node, check_composite
from .errors import ConfigError, NoCompositeError
from .runs import KeepEarlierRuns, keep_earlier_csv_logs, refuse_to_overwrite, resume_command, resume_path
from .schema import TrainConfig, register_configs

__all__ = [
    "ConfigError",
    "KeepEarlierRuns",
    "NoCompositeError",
    "TrainConfig",
    "available_composites",
    "build",
    "build_node",
    "check_composite",
    "keep_earlier_csv_logs",
    "refuse_to_overwrite",
    "register_configs",
    "resume_command",
    "resume_path",
]
