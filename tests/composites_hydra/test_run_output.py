"""RunOutput, the Hydra callback of a run's output: each job's train.log without noise, a sweep's summary table."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_a_sweep_ends_with_one_table_and_each_run_fills_its_train_log_without_noise(documented_sweep):
    # The README's sweep (tests/conftest.py), RunOutput and TerminalProgress as configs/ wire them:
    # python scripts/train.py -m +composite=conditional 'module.guard.may_skip=[experts.*]' seed=0,1, 2 batches
    command, sweep, done = documented_sweep
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    table = out[out.index("sweep of 2 runs") :].splitlines()[2:5]
    every_job = "every job: +composite=conditional module.guard.may_skip=[experts.*]"
    assert out[out.index("sweep of 2 runs") :].splitlines()[1].startswith(every_job), command
    assert table[0].split() == ["job", "overrides", "val/acc", "test/acc", "test/loss", "status"]
    assert [row.split()[:2] for row in table[1:]] == [["0", "seed=0"], ["1", "seed=1"]]
    assert all(row.split()[-1] == "ok" and len(row.split()) == 6 for row in table[1:])
    assert "\r" not in out and "Tip:" not in out and "`srun`" not in out and "LeafSpec" not in out
    for job in ("0", "1"):
        log = (sweep / job / "train.log").read_text()
        assert "`Trainer.fit` stopped" in log and "Epoch 0/0  step 2" in log
    assert (sweep / "summary.csv").read_text().splitlines()[0] == "job,overrides,val/acc,test/acc,test/loss,status"


def test_a_sweep_into_a_used_sweep_dir_keeps_the_earlier_summary(tmp_path):
    from omegaconf import OmegaConf

    from composites_hydra.run_output import RunOutput

    (tmp_path / "summary.csv").write_text("first\n")
    (tmp_path / "summary-1.csv").write_text("zeroth\n")
    RunOutput().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary-1.csv", "summary-2.csv"]
    assert (tmp_path / "summary-2.csv").read_text() == "first\n"
