"""``sbatch scripts/slurm/train.sbatch`` as the README gives it, with the CPU overrides, on a real cluster."""

import pytest

from tests import ROOT
from tests.cluster.slurm import TINY, cpu_options, needs_cluster, sbatch, wait_for

pytestmark = [needs_cluster, pytest.mark.slow]


def test_sbatch_ddp_job_on_two_tasks_passes_arguments_through_and_logs_without_a_progress_bar(tmp_path):
    run = tmp_path / "run"
    overrides = [
        "+composite=sequential",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=4",
        f"hydra.run.dir={run}",
    ]
    job_id = sbatch(cpu_options(tmp_path), ROOT / "scripts" / "slurm" / "train.sbatch", [*TINY, *overrides])
    info = wait_for(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    assert "MEMBER: 1/2" in log and "MEMBER: 2/2" in log  # two DDP ranks
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in log  # trainer.max_epochs=1 got through
    assert log.count("test/acc") == 1  # one table, from rank zero
    assert f"run directory: {run}" in log
    assert "\r" not in log  # no progress bar in the job log
    assert (run / "checkpoints" / "last.ckpt").exists()
