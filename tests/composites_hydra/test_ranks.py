"""Two real processes meet in rank 0's TCPStore, as srun's tasks do: one decision for both, one stop for both."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from composites_hydra.ranks import Launch, detect_launch
from tests.processes import free_port, repository_env

RANK = """
import sys, time
from composites_hydra.ranks import Launch, agree, stop_together
rank, port, case = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
launch = Launch(rank=rank, world_size=2, address="127.0.0.1", port=port, hosts_store=True, prefix="composites/")
error = "the run directory /runs/a already holds a run" if case == "refuse" else None
decision = agree(lambda: {"run_dir": "/runs/a", "error": error}, launch)
print(f"rank {rank} runs in {decision['run_dir']}", flush=True)
with stop_together():
    if rank == 1:
        raise ValueError("no such data file")
    time.sleep(120)  # rank 0 waits, as in the process group's rendezvous
"""


def run_two_ranks(tmp_path, case: str) -> tuple[list[subprocess.CompletedProcess], float]:
    script, port = tmp_path / "rank.py", free_port()
    script.write_text(RANK)
    start = time.monotonic()
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(port), case],
            env=repository_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (1, 0)  # the other rank starts first: it waits for rank 0
    ]
    try:
        outputs = [p.communicate(timeout=90) for p in ranks]
    finally:
        for p in ranks:
            p.kill()
    done = [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(ranks, outputs)]
    return done[::-1], time.monotonic() - start  # rank 0 first


@pytest.mark.slow
def test_rank_zeros_refusal_stops_both_ranks_with_its_message(tmp_path):
    (zero, one), _ = run_two_ranks(tmp_path, "refuse")
    assert (zero.returncode, zero.stdout, zero.stderr) == (
        1,
        "",
        "error: the run directory /runs/a already holds a run\n",
    )
    assert (one.returncode, one.stdout) == (1, "")
    assert one.stderr == "error (rank 1 of 2, as rank 0 decided): the run directory /runs/a already holds a run\n"


@pytest.mark.slow
def test_a_rank_that_fails_before_the_process_group_is_up_stops_rank_zero_within_seconds(tmp_path):
    (zero, one), seconds = run_two_ranks(tmp_path, "fail")
    assert (zero.stdout, one.stdout) == ("rank 0 runs in /runs/a\n", "rank 1 runs in /runs/a\n")
    assert one.returncode == 1 and one.stderr.rstrip().endswith("ValueError: no such data file")
    assert (zero.returncode, zero.stderr) == (1, "error: rank 1 stopped: ValueError: no such data file\n")
    assert seconds < 60  # rank 0 would sleep 120 s


def test_srun_and_torchrun_are_recognised_and_a_batch_script_or_one_process_is_not():
    step = {"SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "98765", "SLURM_NODELIST": "n[07-08]"}
    assert detect_launch({**step, "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}) == Launch(
        rank=2, world_size=4, address="n07", port=23765, hosts_store=True, prefix="composites/"
    )
    assert detect_launch({**step, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None  # one task
    batch = {k: v for k, v in step.items() if k != "SLURM_STEP_ID"}
    assert detect_launch({**batch, "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) is None  # the batch script itself
    assert detect_launch({**step, "SLURM_JOB_NAME": "interactive", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) is None
    torchrun = {"TORCHELASTIC_RUN_ID": "r", "RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29400"}
    assert detect_launch(torchrun) == Launch(
        rank=1, world_size=2, address="h", port=29400, hosts_store=False, prefix="composites/restart-0/"
    )
