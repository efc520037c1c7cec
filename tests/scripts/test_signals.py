"""Real signals to a real scripts/train.py: finish the step, save, say how to resume, exit non-zero (DDP: no hang)."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.processes import repository_env
from tests.scripts.train_helpers import ROOT

SCRIPT = str(ROOT / "scripts" / "train.py")
LONG = [  # runs far longer than the test waits: only a signal ends it
    "+composite=sequential",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=1000",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=1",
    "callbacks.step_checkpoint.every_n_steps=2",  # last.ckpt appears once training is under way
]


def start(run_dir, *extra: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, SCRIPT, *LONG, *extra, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env={**repository_env(), **(env or {})},  # the repository importable: tests.scripts.signal_at
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until_training(process: subprocess.Popen, run_dir) -> None:
    deadline = time.monotonic() + 180
    while not (run_dir / "checkpoints" / "last.ckpt").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.1)


def signal_once_training(process: subprocess.Popen, run_dir, signum: int) -> tuple[str, str]:
    wait_until_training(process, run_dir)
    process.send_signal(signum)
    return process.communicate(timeout=180)


def saved_step(out: str, name: str, run_dir) -> int:
    match = re.search(rf"{name} received: checkpoint of step (\d+) saved to (\S+)\n", out)
    assert match, out[-3000:]
    assert match.group(2) == str(run_dir / "checkpoints" / "last.ckpt")
    return int(match.group(1))


def stopped_as_promised(process: subprocess.Popen, out: str, err: str, name: str, run_dir) -> int:
    assert process.returncode == 128 + getattr(signal, name), err[-3000:]
    step = saved_step(out, name, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == step  # the step it says, whole
    assert sorted(p.name for p in last.parent.iterdir() if not p.name.startswith("best-")) == ["last.ckpt"]
    assert "test metric" not in out  # stopped: no test of a half-trained model
    return step


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> dict[str, tuple[subprocess.Popen, str, str, object]]:
    """A SIGTERM and a ctrl-c (SIGINT) to two runs started together (most of their time is imports).

    ``{signal name: (process, stdout, stderr, run directory)}``, each run signalled once it trains.
    """
    runs = {name: tmp_path_factory.mktemp(name) for name in ("SIGTERM", "SIGINT")}
    processes = {name: start(run_dir) for name, run_dir in runs.items()}
    for name, process in processes.items():  # each signalled as soon as it trains, not after the other ended
        wait_until_training(process, runs[name])
        process.send_signal(getattr(signal, name))
    return {name: (process, *process.communicate(timeout=180), runs[name]) for name, process in processes.items()}


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_save_a_checkpoint_say_how_to_resume_and_exit_non_zero(stopped, name):
    process, out, err, run_dir = stopped[name]
    stopped_as_promised(process, out, err, name, run_dir)
    command = out.split("resume with: ")[1].splitlines()[0]
    assert command.startswith("python scripts/train.py +composite=sequential ")
    assert command.endswith(f" ckpt_path=auto hydra.run.dir={run_dir}")


def test_ctrl_c_twice_stops_at_once_with_status_130_and_names_the_newest_checkpoint(tmp_path):
    # the second Ctrl-C comes before the step's end, where the first would be acted on
    process = start(
        tmp_path,
        "+callbacks.stop._target_=tests.scripts.signal_at.SignalAt",
        "+callbacks.stop.step=3",
        "+callbacks.stop.signal_name=SIGINT-twice",
    )
    out, err = process.communicate(timeout=300)
    assert process.returncode == 130, err[-3000:]
    said = out + err
    assert "Traceback" not in said and "Detected KeyboardInterrupt" not in said
    assert (
        f"stopped at once, without saving the step under way; the newest checkpoint is {tmp_path}/checkpoints/last.ckpt"
        in out
    )
    assert out.split("resume with: ")[1].splitlines()[0].endswith(f" ckpt_path=auto hydra.run.dir={tmp_path}")


@pytest.mark.slow
def test_the_requeue_signal_requeues_the_slurm_job_and_the_printed_command_resumes(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/scontrol.args\n')
    (fake_bin / "scontrol").chmod(0o755)
    run_dir = tmp_path / "run"
    slurm = {"SLURM_JOB_ID": "4242", "PATH": f"{fake_bin}{os.pathsep}{os.environ['PATH']}"}
    process = start(run_dir, env=slurm)
    out, err = signal_once_training(process, run_dir, signal.SIGUSR1)
    step = stopped_as_promised(process, out, err, "SIGUSR1", run_dir)
    assert (tmp_path / "scontrol.args").read_text() == "requeue 4242\n"
    assert "scontrol requeue 4242: done" in out

    # What the requeued job (or a user) runs: the printed command, bounded here by a smaller max_epochs.
    command = shlex.split(out.split("resume with: ")[1].splitlines()[0])
    epochs = step // 5 + 2  # 5 batches an epoch: the stopped epoch and one more
    resumed = subprocess.run(
        [sys.executable, *command[1:], f"trainer.max_epochs={epochs}"], cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        f"Restoring states from the checkpoint path at {run_dir}/checkpoints/last.ckpt"
        in resumed.stdout + resumed.stderr
    )
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5 * epochs
    assert "test/acc" in resumed.stdout


@pytest.mark.slow
def test_under_two_process_ddp_a_sigterm_to_one_rank_stops_both_after_one_save(tmp_path):
    process = start(tmp_path, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    out, err = signal_once_training(process, tmp_path, signal.SIGTERM)  # to rank zero only
    assert process.returncode == 143, err[-3000:]
    assert out.count("received: checkpoint of step") == 1  # rank zero prints; both ranks saved and stopped
    step = saved_step(out, "SIGTERM", tmp_path)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step
