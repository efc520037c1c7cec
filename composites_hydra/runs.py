"""Where a run resumes from, and what it must not overwrite of an earlier run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def keep_earlier_csv_logs(logger: dict[str, Any]) -> None:
    """A resumed run that logs CSV where its first run did gets a fresh version folder.

    Lightning's CSVLogger deletes a ``metrics.csv`` it finds in its log directory, so resuming
    in the same run directory would wipe the earlier epochs' rows. The resumed run writes
    ``<name>/resume-<n>/metrics.csv`` instead; every earlier file stays.

    >>> conf = {"_target_": "pytorch_lightning.loggers.CSVLogger", "save_dir": "/nonexistent", "name": "logs", "version": ""}
    >>> keep_earlier_csv_logs(conf); conf["version"]
    ''
    """
    if not str(logger.get("_target_", "")).endswith("CSVLogger"):
        return
    logs = Path(logger["save_dir"]) / str(logger.get("name") or "")
    version = logger.get("version")
    if version is None or not (logs / str(version) / "metrics.csv").exists():
        return
    n = 1
    while (logs / f"resume-{n}").exists():
        n += 1
    logger["version"] = f"resume-{n}"


def resume_path(ckpt_path: str | None, run_dir: str) -> str | None:
    """``ckpt_path=auto`` resumes whatever the run directory holds (a requeued cluster job).

    Lightning itself resumes from the ``hpc_ckpt_*.ckpt`` its SLURM plugin writes before a time
    limit (with ``ckpt_path=None``); without one (a node failure, a submitit requeue), the
    newest ``last.ckpt``; in a fresh directory, nothing.

    >>> resume_path("auto", "/nonexistent") is None
    True
    """
    if ckpt_path != "auto":
        return ckpt_path
    run = Path(run_dir)
    if any(run.glob("hpc_ckpt_*.ckpt")):
        return None
    return "last" if any(run.glob("**/last*.ckpt")) else None
