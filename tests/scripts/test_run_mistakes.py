"""Mistakes that would land a run on an earlier run's files, or resume what cannot be continued: refused first.

Every refusal comes before anything is written: the earlier files stay byte for byte, and no
``.hydra/resume-<n>/`` or ``logs/resume-<n>/`` is left for a resume that never ran.
"""

from __future__ import annotations

import logging
import os
import subprocess

import pytest
from omegaconf import OmegaConf

from composites_hydra import ConfigError, resume_path
from composites_hydra.runs import earlier_sweep_resume
from tests.processes import TRAIN
from tests.scripts.train_helpers import QUICK, compose_train, train

STOP_MID_EPOCH = ["+callbacks.stop._target_=tests.scripts.signal_at.SignalAt", "+callbacks.stop.step=2"]
RUN = [*QUICK, "+composite=sequential", "trainer.limit_train_batches=6"]


def run_script(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([*TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def files(folder) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run of the sequential composite stopped by SIGTERM mid-epoch, its config recorded as the script records it."""
    run_dir = tmp_path_factory.mktemp("stopped")
    cfg = compose_train(run_dir, [*RUN, *STOP_MID_EPOCH])
    with pytest.raises(SystemExit):
        train.train(cfg)
    (run_dir / ".hydra").mkdir()
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir


@pytest.mark.slow
def test_a_sweep_into_a_used_sweep_dir_is_refused_before_hydra_writes_a_file(tmp_path):
    sweep = tmp_path / "sweep"  # an earlier sweep, as Hydra lays it out
    for name, text in [
        ("multirun.yaml", "hydra: {}\n"),
        ("0/.hydra/config.yaml", "seed: 0\n"),
        ("0/.hydra/overrides.yaml", "- +composite=sequential\n- seed=0\n"),
        ("0/checkpoints/last.ckpt", "weights"),
    ]:
        (sweep / name).parent.mkdir(parents=True, exist_ok=True)
        (sweep / name).write_text(text)
    before = files(tmp_path)
    done = run_script("-m", "+composite=parallel", "seed=5", *QUICK, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: the sweep directory hydra.sweep.dir={sweep} already holds a sweep (")
    assert "resume it:   add ckpt_path=auto" in done.stderr and "start fresh: leave hydra.sweep.dir out" in done.stderr
    assert "Traceback" not in done.stderr and files(tmp_path) == before


def test_sweep_jobs_that_would_share_one_directory_are_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"hydra.sweep.subdir=same is the same for every job"):
        earlier_sweep_resume(tmp_path, None, "same")


@pytest.mark.slow
def test_an_unwritable_run_dir_is_one_error_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    done = run_script("+composite=sequential", *QUICK, f"hydra.run.dir={tmp_path}/a-file/run", cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith(f"error: hydra.run.dir={tmp_path}/a-file/run cannot be written (")
    assert done.stderr.count("\n") == 1


def test_ckpt_path_auto_with_nothing_to_resume_says_it_trains_from_scratch(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="composites_hydra.runs"):
        assert resume_path("auto", str(tmp_path)) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"ckpt_path=auto: nothing to resume in {tmp_path} (no last.ckpt, no hpc_ckpt_*.ckpt): training from scratch. "
        "To resume an earlier run, give its directory: hydra.run.dir=<that run's dir>"
    ]


def test_a_mid_epoch_resume_with_another_batch_size_is_refused_before_training(stopped_run):
    before = files(stopped_run)
    with pytest.raises(ConfigError) as refused:
        train.train(compose_train(stopped_run, [*RUN, "ckpt_path=auto", "data.batch_size=32"]))
    message = str(refused.value)
    assert "stopped mid-epoch (epoch 0, after 2 batches)" in message
    assert "data.batch_size=32 (the checkpoint's run had 64)" in message
    assert "resume exactly: add data.batch_size=64" in message
    assert files(stopped_run) == before


@pytest.mark.slow
def test_a_resume_into_a_run_of_another_model_is_refused_naming_the_sub_models_and_leaves_nothing(stopped_run):
    before = files(stopped_run)
    done = run_script("+composite=parallel", *QUICK, "ckpt_path=auto", f"hydra.run.dir={stopped_run}", cwd=stopped_run)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: ckpt_path={stopped_run}/checkpoints/last.ckpt holds another model")
    assert "only in the checkpoint: sub-model(s) encoder" in done.stderr
    assert "only in this config: sub-model(s) fuse" in done.stderr
    assert "Traceback" not in done.stderr and files(stopped_run) == before
    assert not list(stopped_run.glob("**/resume-*"))


def test_a_mid_epoch_resume_with_another_training_seed_is_refused(stopped_run):
    before = files(stopped_run)
    with pytest.raises(ConfigError, match=r"seed=1 \(the checkpoint's run had 0\).*\n  resume exactly: add seed=0"):
        train.train(compose_train(stopped_run, [*RUN, "ckpt_path=auto", "seed=1"]))
    assert files(stopped_run) == before


def test_a_run_that_starts_in_the_same_second_as_another_gets_its_own_directory(tmp_path):
    from composites_hydra.runs import decide_run

    same_second = tmp_path / "outputs" / "2026-01-01" / "12-00-00"  # what ${now:...} gives both
    first = decide_run(same_second, None, ".hydra", timestamped=True)
    second = decide_run(same_second, None, ".hydra", timestamped=True)
    chosen = decide_run(same_second, None, ".hydra")  # a hydra.run.dir the user gave is kept (and checked)
    assert (first["run_dir"], second["run_dir"], chosen["run_dir"]) == (
        str(same_second),
        f"{same_second}-1",
        str(same_second),
    )
    assert sorted(p.name for p in same_second.parent.iterdir()) == ["12-00-00", "12-00-00-1"]
