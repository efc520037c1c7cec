"""A real SLURM cluster for the tests: is one there, submit to it, watch a job, read its logs.

Nothing here fakes SLURM: these call ``sinfo``, ``sbatch``, ``scontrol`` and ``scancel``. A
cluster for the tests comes from ``.ci/slurm_cluster.sh`` (slurmctld and slurmd on this machine).
The cluster has no accounting database, so job states come from ``scontrol show job``, which
keeps a finished job for ``MinJobAge`` (300 s on the test cluster).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests import ROOT

FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# Tiny runs: a few batches of the digits, no gradient plot. The progress bar is left as configured:
# it must stay out of job logs by itself.
TINY = [
    "trainer.accelerator=cpu",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "~callbacks.gradient_plot",
]


@functools.cache
def nodes() -> list[str]:
    """The names of the cluster's usable nodes (idle, mixed or allocated); empty without a cluster."""
    if shutil.which("sinfo") is None:
        return []
    try:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return []
    if done.returncode != 0:
        return []
    usable = ("idle", "mix", "alloc", "comp")
    return sorted({n for n, state in (line.split() for line in done.stdout.splitlines()) if state.startswith(usable)})


needs_cluster = pytest.mark.skipif(
    not nodes(), reason="no SLURM cluster answers sinfo (.ci/slurm_cluster.sh starts one)"
)


def cpu_options(tmp_path, tasks: int = 2) -> list[str]:
    """The README's CPU-partition options: no GPUs, one CPU per task, spread over up to ``tasks`` nodes."""
    n = min(tasks, len(nodes()))
    return [
        "--gpus-per-node=0",
        f"--nodes={n}",
        f"--ntasks-per-node={tasks // n}",
        "--cpus-per-task=1",
        "--mem=2G",
        "--time=10",
        f"--output={tmp_path}/slurm-%j.out",
    ]


def sbatch(options: list[str], script: Path | str, args: list[str] = (), cwd: Path = ROOT) -> str:
    """Submit ``script`` with sbatch ``options`` (they replace its #SBATCH lines); return the job id."""
    done = subprocess.run(
        ["sbatch", "--parsable", *options, str(script), *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def job(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a mapping (JobState, ExitCode, Restarts, Reason, ...)."""
    done = subprocess.run(["scontrol", "-o", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout))


def wait_for(job_id: str, states: set[str], timeout: float, release: bool = False) -> dict[str, str]:
    """Wait until the job is in one of ``states``; fail after ``timeout`` seconds (and cancel it).

    ``release``: a requeued job waits about two minutes before it may start again (SLURM's
    requeue delay, Reason=BeginTime); start it at once instead.
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        info = job(job_id)
        if info["JobState"] in states:
            return info
        if release and info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
        time.sleep(0.2)  # a requeued job waits for its release here: a long pause delays the next leg
    cancel(job_id)
    raise AssertionError(f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {job(job_id)}")


def wait_for_text(path: Path, pattern: str, timeout: float, job_id: str | None = None) -> re.Match:
    """Wait until the file at ``path`` holds ``pattern`` (a multi-line regular expression); return the match."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = re.search(pattern, path.read_text(errors="replace"), re.MULTILINE) if path.exists() else None
        if found:
            return found
        if job_id is not None and job(job_id)["JobState"] in FINISHED:
            break
        time.sleep(0.2)
    if job_id is not None:
        cancel(job_id)
    text = path.read_text(errors="replace")[-3000:] if path.exists() else "(no file)"
    raise AssertionError(f"{pattern!r} not in {path} after {timeout:.0f} s:\n{text}")


def wait_for_file(folder: Path, pattern: str, timeout: float) -> Path:
    """Wait until a file matching the glob ``pattern`` exists under ``folder``; return it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.2)
    raise AssertionError(f"no {pattern} under {folder} after {timeout:.0f} s")


def steps(log: str) -> list[int]:
    """The global steps a job printed (``step N`` lines of :class:`tests.cluster.step_marks.StepMarks`)."""
    return [int(n) for n in re.findall(r"^step (\d+)$", log, flags=re.MULTILINE)]


def signal(job_id: str, name: str) -> None:
    """Send signal ``name`` (``USR1``, ``TERM``, ...) to every task of the job's steps, as SLURM's
    ``--signal`` does before the time limit (not to the batch shell)."""
    subprocess.run(["scancel", f"--signal={name}", job_id], check=True, timeout=30)


def requeue(job_id: str) -> None:
    """``scontrol requeue``: SLURM sends the job SIGTERM, then puts it back in the queue."""
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)


def cancel(job_id: str) -> None:
    """Cancel the job, whatever its state (a test never leaves one behind)."""
    subprocess.run(["scancel", job_id], timeout=30)
