"""Runs that lose nothing: exact resume after a signal, a crash or a clean stop; earlier runs kept; atomic checkpoints."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from composites.training import AtomicCheckpointIO
from composites_hydra import ConfigError
from tests.scripts.train_helpers import QUICK, ROOT, SHARED_RUN, compose_train, train

RUN = [
    *QUICK,
    "+composite=sequential",
    "trainer.log_every_n_steps=1",
    "trainer.limit_train_batches=6",
    "trainer.max_epochs=2",
]
STOP_AT = "+callbacks.stop._target_=tests.scripts.signal_at.SignalAt"


def logged(run_dir) -> dict[tuple[int, str], str]:
    """Every value the run directory's CSV logs hold, by (step, key); a value logged twice must agree."""
    values: dict[tuple[int, str], str] = {}
    for path in sorted((run_dir / "logs").glob("**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if value and key not in ("step", "epoch"):
                        assert values.setdefault((int(row["step"]), key), value) == value, (path, row["step"], key)
    return values


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    train.train(compose_train(run_dir, RUN))
    return logged(run_dir)


@pytest.mark.parametrize(
    "stop",
    [
        pytest.param([STOP_AT, "+callbacks.stop.step=2"], id="sigterm-mid-epoch"),
        pytest.param(["trainer.max_epochs=1"], id="clean-stop-at-an-epoch-boundary"),
        pytest.param(
            [STOP_AT, "+callbacks.stop.step=5", "+callbacks.stop.signal_name=SIGINT"],
            id="ctrl-c-on-an-epochs-last-batch",
            marks=pytest.mark.slow,
        ),
        pytest.param(
            [
                STOP_AT,
                "+callbacks.stop.step=9",
                "+callbacks.stop.signal_name=crash",
                "callbacks.step_checkpoint.every_n_steps=2",
            ],
            id="crash-after-a-step-checkpoint",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_a_stopped_and_resumed_run_logs_exactly_what_the_straight_run_logs(tmp_path, straight, stop):
    try:
        train.train(compose_train(tmp_path, [*RUN, *stop]))
    except (SystemExit, RuntimeError) as stopped:  # TrainingInterrupted is a SystemExit; the crash a RuntimeError
        assert getattr(stopped, "code", 1) != 0
    else:  # only the clean stop ends without an exception: a signal or crash that never came tests nothing
        assert stop == ["trainer.max_epochs=1"], "the first run was not stopped"
    train.train(compose_train(tmp_path, [*RUN, "ckpt_path=auto"]))
    resumed = logged(tmp_path)
    if stop == ["trainer.max_epochs=1"]:  # the first run tested its 1-epoch model: rows the straight run lacks
        resumed = {k: v for k, v in resumed.items() if not (k[1].startswith("test/") and k[0] == 6)}
    assert resumed == straight


def test_a_fresh_run_into_a_used_run_directory_is_refused_and_changes_nothing(tmp_path):
    train.train(compose_train(tmp_path, QUICK + ["+composite=sequential"]))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match=r"already holds a run \(checkpoints/best-00-3.ckpt, checkpoints/last.ckpt"):
        train.train(compose_train(tmp_path, QUICK + ["+composite=sequential"]))
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def run_script(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *args], cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.mark.slow
def test_the_command_line_refuses_a_used_run_directory_and_a_resume_keeps_the_first_config(tmp_path, finished_run):
    first_dir, first = finished_run  # SHARED_RUN: QUICK's limits, in a directory of its own
    assert first.returncode == 0, first.stderr[-2000:]
    run_dir = tmp_path / "run"
    shutil.copytree(first_dir, run_dir)  # this test writes into the run directory: a copy of the finished one
    recorded = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
    metrics = (run_dir / "logs" / "metrics.csv").read_bytes()

    again = run_script(*SHARED_RUN, "seed=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert again.returncode == 1
    assert f"error: the run directory {run_dir} already holds a run (" in again.stderr
    assert "resume it:   add ckpt_path=auto" in again.stderr and "start fresh: leave hydra.run.dir out" in again.stderr
    assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir() if p.is_file()} == recorded

    resumed = run_script(
        *SHARED_RUN,
        "trainer.max_epochs=2",
        "ckpt_path=auto",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir() if p.is_file()} == recorded
    assert "trainer.max_epochs=2" in (run_dir / ".hydra" / "resume-1" / "overrides.yaml").read_text()
    assert (run_dir / "logs" / "metrics.csv").read_bytes() == metrics
    assert (run_dir / "logs" / "resume-1" / "metrics.csv").is_file()


WRITER = """
import sys, torch
from composites.training import AtomicCheckpointIO
io, i = AtomicCheckpointIO(), 0
while True:
    io.save_checkpoint({"i": i, "x": torch.full((8_000_000,), float(i))}, sys.argv[1])
    i += 1
"""


def test_kill_9_while_a_checkpoint_is_written_leaves_a_whole_one(tmp_path):
    path = tmp_path / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # into a later write
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    saved = torch.load(path, weights_only=True)  # whole: it loads, and every element is the same write's
    assert saved["x"].shape == (8_000_000,) and bool((saved["x"] == saved["i"]).all())
    assert [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"] in ([], [f".last.ckpt.tmp-{writer.pid}"])


def test_an_atomic_save_that_fails_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": 2, "bad": Unpicklable()}, tmp_path / "last.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True) == {"step": 1}
