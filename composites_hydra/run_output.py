"""A Hydra callback for a run's output: Lightning's log in ``train.log``, its noise silenced, a sweep's summary table.

In ``configs/train.yaml``::

    hydra:
      callbacks:
        run_output:
          _target_: composites_hydra.run_output.RunOutput

Each job (in its own process, also on a cluster) writes one JSON record into
``<sweep dir>/.summary/``; when a ``-m`` sweep ends, the launching process prints one table of
the jobs (their overrides, the monitored value each returned, their test metrics) and writes it as
``<sweep dir>/summary.csv`` (a sweep dir used again keeps the earlier table as ``summary-<n>.csv``).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from composites.training.logs import quiet_lightning, route_lightning_logs

log = logging.getLogger(__name__)
RECORDS = ".summary"


def last_test_metrics(run_dir: Path) -> dict[str, float]:
    """The last logged value of each ``test/*`` metric in the run's CSV logs (newest file last).

    >>> last_test_metrics(Path("/nonexistent"))
    {}
    """
    found: dict[str, float] = {}
    for path in sorted(run_dir.glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime):
        with open(path) as f:
            for row in csv.DictReader(f):
                found.update({k: float(v) for k, v in row.items() if k and k.startswith("test/") and v})
    return found


def format_summary(records: list[dict[str, Any]], monitor: str) -> str:
    """One row per job: number, the overrides that differ between jobs, the monitored value, test metrics, status.

    >>> print(format_summary([{"num": 0, "overrides": ["+composite=mlp", "seed=1"], "value": 0.5,
    ...                        "test": {"test/acc": 0.9}, "status": "ok"},
    ...                       {"num": 1, "overrides": ["+composite=mlp", "seed=2"], "value": None,
    ...                        "test": {}, "status": "failed: ValueError"}], "val/acc"))
    every job: +composite=mlp
    job  overrides  val/acc  test/acc  status
    0    seed=1     0.5000   0.9000    ok
    1    seed=2     -        -         failed: ValueError
    """
    common = set.intersection(*(set(r["overrides"]) for r in records)) if len(records) > 1 else set()
    tests = sorted({k for r in records for k in r.get("test", {})})
    header = ["job", "overrides", monitor, *tests, "status"]
    rows = [
        [
            str(r["num"]),
            " ".join(o for o in r["overrides"] if o not in common) or "(none)",
            _number(r.get("value")),
            *(_number(r.get("test", {}).get(k)) for k in tests),
            r["status"],
        ]
        for r in sorted(records, key=lambda r: r["num"])
    ]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    if common:
        lines.insert(0, "every job: " + " ".join(o for o in records[0]["overrides"] if o in common))
    return "\n".join(lines)


def _number(value: Any) -> str:
    if isinstance(value, (int, float)) and not math.isnan(value):
        return f"{value:.4f}"
    return "-"


class RunOutput(Callback):
    """Route Lightning's log to the job's log file, silence its noise, summarise a ``-m`` sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        for old in (sweep / RECORDS).glob("*.json"):  # a sweep dir used again: its table is in summary.csv
            old.unlink()
        if (sweep / "summary.csv").exists():  # the earlier sweep's table stays, as summary-<n>.csv
            n = 1
            while (sweep / f"summary-{n}.csv").exists():
                n += 1
            (sweep / "summary.csv").rename(sweep / f"summary-{n}.csv")

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        route_lightning_logs()  # Hydra has configured logging by now: train.log gets Lightning's records
        quiet_lightning()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(config.hydra.runtime.output_dir)
        try:
            value, status = job_return.return_value, "ok"  # re-raises what a failed job raised
        except BaseException as error:  # noqa: B036 (a job may end in SystemExit or KeyboardInterrupt)
            value, status = None, f"failed: {type(error).__name__}"
        record = {
            "num": int(config.hydra.job.num),
            "overrides": list(config.hydra.overrides.task),
            "value": float(value) if isinstance(value, (int, float)) else None,
            "test": last_test_metrics(run_dir),
            "status": status,
        }
        records = Path(config.hydra.sweep.dir) / RECORDS
        records.mkdir(parents=True, exist_ok=True)
        (records / f"{record['num']}.json").write_text(json.dumps(record))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        records = [json.loads(p.read_text()) for p in sorted((sweep / RECORDS).glob("*.json"))]
        if not records:
            return
        monitor = str(config.get("monitor", "value"))
        _write_csv(sweep / "summary.csv", records, monitor)
        print(f"sweep of {len(records)} runs in {sweep} (also summary.csv there):\n{format_summary(records, monitor)}")


def _write_csv(path: Path, records: list[dict[str, Any]], monitor: str) -> None:
    tests = sorted({k for r in records for k in r.get("test", {})})
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["job", "overrides", monitor, *tests, "status"])
        for r in sorted(records, key=lambda r: r["num"]):
            writer.writerow(
                [r["num"], " ".join(r["overrides"]), r.get("value"), *(r["test"].get(k) for k in tests), r["status"]]
            )
