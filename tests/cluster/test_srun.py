"""Plain ``srun`` with 2 tasks, each composing its own config: one run directory, rank 0's decision, one stop.

Over two nodes where the cluster has them (one task per node), else two tasks on one node.
No ``--kill-on-bad-exit``: the ranks themselves must not leave each other waiting. A resume under
srun (``hydra.run.dir`` with ``ckpt_path=auto``) is what test_sbatch.py and test_requeue.py run.
"""

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests import ROOT
from tests.cluster.slurm import TINY, needs_cluster, nodes
from tests.processes import TRAIN

pytestmark = [needs_cluster, pytest.mark.slow]

RUN = [*TINY, "+composite=sequential", "trainer=ddp", "trainer.max_epochs=1", "trainer.limit_train_batches=2"]


def srun(tmp_path: Path, *args: str, command: list[str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """``srun`` 2 tasks of ``train.py args`` (or ``command``) in ``tmp_path``; the output and the seconds it took."""
    n = min(2, len(nodes()))
    options = [f"--nodes={n}", f"--ntasks-per-node={2 // n}", "--cpus-per-task=1", "--gpus-per-node=0", "--mem=2G"]
    trainer = [f"trainer.num_nodes={n}", f"trainer.devices={2 // n}", "trainer.enable_progress_bar=false"]
    start = time.monotonic()
    done = subprocess.run(
        ["srun", "--label", "--job-name=train", "--time=5", *options, *(command or [*TRAIN, *RUN, *trainer, *args])],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    return done, time.monotonic() - start


def files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_srun_without_a_run_dir_trains_in_one_directory_and_a_fresh_run_into_it_is_refused_by_every_rank(tmp_path):
    fresh, _ = srun(tmp_path)  # no hydra.run.dir, no ckpt_path: each task composes outputs/<date>/<time>
    assert fresh.returncode == 0, fresh.stdout[-3000:] + fresh.stderr[-3000:]
    (run,) = (tmp_path / "outputs").glob("*/*")  # one directory for both ranks, rank 0's
    assert {p.name for p in run.iterdir()} == {".hydra", "checkpoints", "logs", "train.log", "train_rank_1.log"}
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in (run / "train_rank_1.log").read_text()
    assert fresh.stdout.count("test/acc") == 1 and f"run directory: {run}" in fresh.stdout

    before = files(run)
    refused, seconds = srun(tmp_path, f"hydra.run.dir={run}")  # no ckpt_path: rank 0 refuses for both
    assert refused.returncode != 0
    assert re.search(rf"^0: error: the run directory {run} already holds a run \(", refused.stderr, re.M)
    assert re.search(r"^1: error \(rank 1 of 2, as rank 0 decided\): the run directory", refused.stderr, re.M)
    assert files(run) == before and seconds < 90  # nothing written, nobody left waiting


def test_a_rank_that_fails_before_the_process_group_is_up_stops_the_other_with_its_message(tmp_path):
    # rank 1 alone gets a callback that does not exist: it fails in build, rank 0 waits in the rendezvous
    trainer = "trainer.num_nodes=$SLURM_NNODES trainer.devices=$SLURM_NTASKS_PER_NODE trainer.enable_progress_bar=false"
    script = (
        f'extra=(); [ "$SLURM_PROCID" = 1 ] && extra=(+callbacks.broken._target_=no.such.Callback); '
        f'exec {" ".join(TRAIN)} {" ".join(RUN)} {trainer} "${{extra[@]}}"'
    )
    done, seconds = srun(tmp_path, command=["bash", "-c", script])
    assert done.returncode != 0
    rank_zero = "\n".join(line[3:] for line in done.stderr.splitlines() if line.startswith("0: "))
    assert rank_zero.startswith("error: rank 1 stopped: ") and "no.such.Callback" in rank_zero, done.stderr[-3000:]
    assert seconds < 90
