"""Hydra's submitit launcher (``-m hydra/launcher=slurm_cpu``) submitting real jobs."""

import subprocess

import pytest

from tests.cluster.slurm import TINY, needs_cluster, signal, steps, wait_for, wait_for_file, wait_for_text
from tests.processes import TRAIN, repository_env

pytestmark = [needs_cluster, pytest.mark.slow]

SUBMITIT = [*TRAIN, "-m", "hydra/launcher=slurm_cpu"]  # a sweep, each point a job on the test cluster


def test_a_two_point_sweep_submits_two_jobs_that_train_and_test_in_their_own_directories(tmp_path):
    limits = ["trainer.max_epochs=1", "trainer.limit_train_batches=3"]
    command = [*SUBMITIT, "+composite=sequential", "seed=0,1", *TINY, *limits, f"hydra.sweep.dir={tmp_path}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # waits for the jobs
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    logs = sorted(tmp_path.glob(".submitit/*_*/*_0_log.out"))
    assert len(logs) == 2
    for log in logs:  # the pickled config unpickled on the node (no "No module named 'schema'"), ran, tested
        text = log.read_text()
        assert text.count("test/acc") == 1, text[-3000:]
        assert "\r" not in text + log.with_name(log.name.replace(".out", ".err")).read_text()  # no progress bar
    for point in ("0", "1"):
        assert (tmp_path / point / "checkpoints" / "last.ckpt").exists()
        assert f"seed={point}" in (tmp_path / point / ".hydra" / "overrides.yaml").read_text().replace("- ", "")


def test_a_submitit_job_that_times_out_saves_is_requeued_by_submitit_and_resumes_at_that_step(tmp_path):
    # scancel --signal=USR2 is what SLURM sends signal_delay_s before the time limit of a submitit
    # job (--signal=USR2@<delay>), and what submitit's own job._interrupt(timeout=True) sends.
    env = repository_env()  # the job imports tests.cluster.step_marks
    command = [
        *SUBMITIT,
        "hydra.launcher.tasks_per_node=2",
        "+composite=sequential",
        "trainer=ddp",
        "trainer.devices=2",
        *TINY,
        "data.batch_size=8",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=20",
        "+callbacks.marks._target_=tests.cluster.step_marks.StepMarks",
        "+callbacks.marks.sleep_s=0.2",
        "+callbacks.marks.first_leg_only=true",  # the leg after the requeue runs at full speed
        "ckpt_path=auto",
        f"hydra.sweep.dir={tmp_path}/sweep-${{now:%H-%M-%S-%f}}",  # resolved once: the requeued job comes back to it
    ]
    with open(tmp_path / "launcher.log", "w") as out:
        launcher = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=env)
    try:
        log_path = wait_for_file(tmp_path, "sweep-*/.submitit/*/*_0_log.out", timeout=120)  # rank 0
        job_id = log_path.parent.name  # one job, no array
        wait_for_text(log_path, r"^step 4$", timeout=180, job_id=job_id)
        signal(job_id, "USR2")
        saved = wait_for_text(log_path, r"SIGUSR2 received: checkpoint of step (\d+) saved", timeout=60, job_id=job_id)
        stopped = int(saved.group(1))
        assert 4 <= stopped < 20  # in the middle of the first epoch
        wait_for_text(log_path, r"submitit requeues the job", timeout=30)
        # submitit logs this once its scontrol requeue returned: from then on RUNNING is the next leg's (a
        # look before it could still see the first leg running, and the job would sit out its BeginTime)
        wait_for_text(log_path, r"Requeued job", timeout=30)
        wait_for(job_id, {"RUNNING", "COMPLETED"}, timeout=300, release=True)  # after the requeue
        assert launcher.wait(timeout=300) == 0, (tmp_path / "launcher.log").read_text()[-3000:]
    finally:
        launcher.kill()
    log = log_path.read_text()
    assert [p.name for p in tmp_path.glob("sweep-*")] == [log_path.parents[2].name]  # one job directory
    first, second = log.split("Starting with JobEnvironment")[1:]  # two legs of the same job
    # submitit exits as soon as it has requeued (before the step's mark): the first leg printed up
    # to the step before the one saved; the second goes on after the one saved, to the end
    assert steps(first) == list(range(1, stopped)) and steps(second) == list(range(stopped + 1, 41))
    assert "Requeued job" in log and second.count("test/acc") == 1
    both = log + log_path.with_name(log_path.name.replace(".out", ".err")).read_text()  # Lightning logs to either
    last = log_path.parents[2] / "0" / "checkpoints" / "last.ckpt"
    assert both.count(f"Restored all states from the checkpoint at {last}") == 1  # the second leg only
