"""Requeues of a 2-task sbatch DDP job: ``scontrol requeue`` mid-epoch, and the time-limit signal, repeatedly.

Each job prints ``step N`` after every optimizer step (rank zero, :class:`tests.cluster.step_marks.StepMarks`).
A job that resumes exactly where it stopped prints 1, 2, ..., N once each over all its legs: no
step lost, none trained twice.
"""

import random
import re
import time
from pathlib import Path

import pytest
import torch

from tests import ROOT
from tests.cluster.slurm import (
    TINY,
    cancel,
    cpu_options,
    needs_cluster,
    requeue,
    sbatch,
    signal,
    steps,
    wait_for,
    wait_for_text,
)

pytestmark = [needs_cluster, pytest.mark.slow]

SCRIPT = ROOT / "scripts" / "slurm" / "train.sbatch"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


def submit(
    tmp_path: Path, monkeypatch, epochs: int, batches: int, sleep_s: float, sleepy_legs: int
) -> tuple[str, Path]:
    """A 2-task job of ``epochs`` x ``batches`` steps (``sleep_s`` after each in its first ``sleepy_legs`` legs)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the job imports tests.cluster.step_marks
    overrides = [
        *TINY,
        "+composite=sequential",
        "data.batch_size=8",
        f"trainer.max_epochs={epochs}",
        f"trainer.limit_train_batches={batches}",
        "+callbacks.marks._target_=tests.cluster.step_marks.StepMarks",
        f"+callbacks.marks.sleep_s={sleep_s}",
        f"+callbacks.marks.sleepy_legs={sleepy_legs}",  # the signalled legs; the last one runs at full speed
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    job_id = sbatch(cpu_options(tmp_path), SCRIPT, overrides)
    return job_id, tmp_path / f"slurm-{job_id}.out"


def legs(log: str) -> list[str]:
    """The log split at each (re)start of the batch script."""
    return re.split(r"^job \d+ \(restart \d+\)", log, flags=re.MULTILINE)[1:]


def test_a_job_requeued_mid_epoch_resumes_at_the_step_where_it_stopped(tmp_path, monkeypatch):
    job_id, log_path = submit(tmp_path, monkeypatch, epochs=2, batches=20, sleep_s=0.2, sleepy_legs=1)
    try:
        wait_for_text(log_path, r"^step 4$", timeout=180, job_id=job_id)
        requeue(job_id)  # SLURM sends SIGTERM, then queues the job again
        saved = wait_for_text(log_path, r"SIGTERM received: checkpoint of step (\d+) saved", timeout=60, job_id=job_id)
        stopped = int(saved.group(1))
        assert 4 <= stopped < 20  # in the middle of the first epoch
        info = wait_for(job_id, ENDED, timeout=300, release=True)
    finally:
        cancel(job_id)
    log = log_path.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]
    first, second = legs(log)
    assert steps(first)[-1] == stopped and steps(second)[0] == stopped + 1  # resumed at the next step
    assert steps(log) == list(range(1, 41))  # every step of the 2 epochs exactly once
    assert "Restored all states from the checkpoint" in second
    assert log.count("test/acc") == 1
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 40


def test_the_time_limit_signal_saves_requeues_and_resumes_three_times_without_a_hang(tmp_path, monkeypatch):
    # SIGUSR1 is what --signal=SIGUSR1@120 sends before the time limit, to every task; here it is
    # sent at a random moment of a running leg (mostly inside a step: forward, backward, all-reduce).
    job_id, log_path = submit(tmp_path, monkeypatch, epochs=3, batches=30, sleep_s=0.02, sleepy_legs=3)
    rng = random.Random(0)
    pattern = r"SIGUSR1 received: checkpoint of step (\d+) saved"
    try:
        stopped = 0
        for cycle in range(1, 4):
            wait_for_text(log_path, rf"^step {stopped + 2}$", timeout=180, job_id=job_id)  # this leg trains
            time.sleep(rng.uniform(0.0, 0.3))
            signal(job_id, "USR1")
            # the leg saves, requeues and ends by itself (no hang until a kill): the job is queued again
            info = wait_for(job_id, {"PENDING", *ENDED}, timeout=90)
            log = log_path.read_text()
            assert info["JobState"] == "PENDING", log[-3000:]
            saved = [int(s) for s in re.findall(pattern, log)]
            assert len(saved) == cycle and saved[-1] > stopped, log[-3000:]
            assert log.count(f"scontrol requeue {job_id}: done") == cycle
            stopped = saved[-1]
            wait_for(job_id, {"RUNNING", *ENDED}, timeout=300, release=True)
        info = wait_for(job_id, ENDED, timeout=300)
    finally:
        cancel(job_id)
    log = log_path.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "3"), log[-3000:]
    assert log.count("SIGUSR1 received") == 3
    assert steps(log) == list(range(1, 91))  # each leg went on from the step the previous one saved
    assert not list((tmp_path / "run").glob("**/hpc_ckpt_*.ckpt"))  # Lightning's own SLURM handler stayed out
    assert log.count("test/acc") == 1
