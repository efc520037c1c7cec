"""Where a run resumes from, and what it must not overwrite of an earlier run."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from .errors import ConfigError


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


def earlier_run_files(run_dir: str | Path) -> list[str]:
    """What an earlier run left in ``run_dir`` that a new run would overwrite or delete (relative paths).

    >>> earlier_run_files("/nonexistent")
    []
    """
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [*run.glob("checkpoints/*.ckpt"), *run.glob("*.ckpt"), *run.glob("logs/**/metrics.csv")]
    return sorted(str(p.relative_to(run)) for p in found)


def refuse_to_overwrite(run_dir: str | Path, ckpt_path: str | None, config_subdir: str | None = None) -> None:
    """Stop a fresh run (no ``ckpt_path``) whose run directory holds an earlier run's results.

    Lightning's CSV logger would delete the earlier ``logs/metrics.csv``, the checkpoints would
    be overwritten and the test would pick the new run's "best"; Hydra would overwrite the
    recorded config (``config_subdir``: ``.hydra``, checked too when given). A resume
    (``ckpt_path`` set) keeps everything: its logs go to ``logs/resume-<n>/``.

    Raises:
        ConfigError: naming the files and the two ways on (resume, or another directory).

    >>> refuse_to_overwrite("/nonexistent", None)
    """
    if ckpt_path is not None:
        return
    files = earlier_run_files(run_dir)
    if config_subdir is not None and (Path(run_dir) / config_subdir / "config.yaml").exists():
        files.append(f"{config_subdir}/config.yaml")
    if not files:
        return
    shown = ", ".join(files[:4]) + (f" (+{len(files) - 4} more)" if len(files) > 4 else "")
    raise ConfigError(
        f"the run directory {run_dir} already holds a run ({shown}); nothing was changed.\n"
        f"  resume it:   add ckpt_path=auto (same hydra.run.dir)\n"
        f"  start fresh: leave hydra.run.dir out (a new outputs/<date>/<time>/) or choose an empty one"
    )


def resume_command(run_dir: str | Path) -> str:
    """The command line that resumes this run in ``run_dir`` (what a signal's message prints).

    Under Hydra: this run's own overrides, with ``ckpt_path=auto hydra.run.dir=<run dir>``.

    >>> resume_command("/runs/a")
    'python scripts/train.py <the same overrides> ckpt_path=auto hydra.run.dir=/runs/a'
    """
    from hydra.core.hydra_config import HydraConfig

    overrides = ["<the same overrides>"]
    if HydraConfig.initialized():
        task = HydraConfig.get().overrides.task
        overrides = [shlex.quote(o) for o in task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
    return " ".join(["python scripts/train.py", *overrides, "ckpt_path=auto", f"hydra.run.dir={run_dir}"])


class KeepEarlierRuns(Callback):
    """A Hydra callback (``hydra.callbacks`` in configs/train.yaml) run before Hydra writes into the run directory.

    A fresh run into a directory that holds an earlier run stops here, before Hydra overwrites
    ``.hydra/config.yaml`` and ``overrides.yaml``; a resume writes its own to ``.hydra/resume-<n>/``.
    Sweeps (``-m``) get a fresh directory per job and are left alone.

    >>> from omegaconf import OmegaConf
    >>> cfg = OmegaConf.create({"hydra": {"run": {"dir": "/nonexistent"}, "output_subdir": ".hydra"}, "ckpt_path": None})
    >>> KeepEarlierRuns().on_run_start(cfg); cfg.hydra.output_subdir  # a fresh directory: nothing to keep
    '.hydra'
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        try:
            run_dir = Path(str(config.hydra.run.dir))
        except Exception:  # an interpolation Hydra resolves later: nothing to compare yet
            return
        try:
            refuse_to_overwrite(run_dir, config.get("ckpt_path"), None if subdir is None else str(subdir))
        except ConfigError as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(1) from None
        if subdir is None or not (run_dir / str(subdir) / "config.yaml").exists():
            return
        n = 1  # a resume: its config goes next to the first run's, not over it
        while (run_dir / str(subdir) / f"resume-{n}").exists():
            n += 1
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.output_subdir = f"{subdir}/resume-{n}"
