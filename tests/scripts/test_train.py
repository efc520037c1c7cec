"""scripts/train.py: in-process runs of every composite, resume from last.ckpt, the real command line."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from tests.scripts.train_helpers import QUICK, ROOT, compose_train, train

SCRIPT = str(ROOT / "scripts" / "train.py")


@pytest.fixture
def built(monkeypatch) -> list[tuple]:
    """What ``train()`` built, ``(datamodule, module, trainer)`` per call, recorded around the real ``build``."""
    made, real = [], train.build
    monkeypatch.setattr(train, "build", lambda cfg: made.append(real(cfg)) or made[-1])
    return made


@pytest.mark.parametrize("name", ["sequential", "parallel", "conditional"])
def test_fast_dev_run_of_each_composite(tmp_path, capsys, name):
    cfg = compose_train(
        tmp_path, [f"+composite={name}", "trainer.fast_dev_run=true", "trainer.enable_progress_bar=false"]
    )
    value = train.train(cfg)
    out = capsys.readouterr().out
    assert 0.0 <= value <= 1.0  # val/acc of the one validation batch
    lines = out.splitlines()
    assert lines[lines.index("test metric  value") + 1].startswith("test/acc     0.")
    assert f"run directory: {tmp_path}" in out


def metric_steps(log_dir, key: str) -> list[int]:
    with open(log_dir / "logs" / "metrics.csv") as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get(key)]


def test_resume_from_last_ckpt_continues_at_the_same_global_step(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    quick = [*QUICK, "+composite=sequential", "trainer.log_every_n_steps=1"]
    score = train.train(compose_train(first, quick))
    last = first / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)  # plain contents: loads without trusting pickles
    assert saved["global_step"] == 3 and saved["epoch"] == 0
    assert not math.isnan(score)

    train.train(compose_train(second, [*quick, "trainer.max_epochs=2", f"ckpt_path={last}"]))
    assert metric_steps(second, "train/loss_step") == [3, 4, 5]  # steps 0-2 were done by the first run
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def run_script(*args: str, cwd, python: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(
        [sys.executable, *python, SCRIPT, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


IMPORTS = ("-X", "importtime")  # Python lists each module it imports on stderr, "import time: ... | name"
HEAVY = {"pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "torch._dynamo"}


def imports_and_rest(err: str) -> tuple[set[str], str]:
    """The modules a ``-X importtime`` run imported, and its stderr without those lines."""
    timed = [line for line in err.splitlines(keepends=True) if line.startswith("import time:")]
    rest = "".join(line for line in err.splitlines(keepends=True) if not line.startswith("import time:"))
    return {line.rsplit("|", 1)[1].strip() for line in timed}, rest


@pytest.mark.slow
def test_the_command_line(tmp_path, finished_run):
    # Started together: each process spends most of its time importing torch. The three mistakes
    # exit before Lightning, torchmetrics or Dynamo load (seconds of imports).
    missing = run_script(cwd=tmp_path, python=IMPORTS)
    bogus = run_script("+composite=bogus", cwd=tmp_path, python=IMPORTS)
    typo = run_script("+composite=sequential", "guard=rase", cwd=tmp_path, python=IMPORTS)
    results = {
        name: (p, *p.communicate(timeout=300)) for name, p in [("missing", missing), ("bogus", bogus), ("typo", typo)]
    }

    # the run of SHARED_RUN: QUICK's limits, the progress bar as configured, the guard's options as the docs write them
    run_dir, ok = finished_run
    p, out, err = ok, ok.stdout, ok.stderr
    assert p.returncode == 0, err
    assert "test/acc" in out and f"run directory: {run_dir}" in out
    ran = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml").module.guard, resolve=True)
    assert (ran["mode"], ran["may_skip"]) == ("warn", ["experts.*"])
    assert "gradient guard (guard='warn'" not in out + err  # a healthy run: under warn the guard had nothing to say
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    # off a terminal: no progress-bar flood, one line per epoch, Lightning's log in train.log, none of its noise
    said = out + err
    assert "\r" not in said and "Epoch 0/0  step 3  " in said
    noise = ("Tip:", "`srun`", "LeafSpec", "multiple `ModelCheckpoint`")
    assert [n for n in noise if n in said] == []
    log = (run_dir / "train.log").read_text()
    assert "`Trainer.fit` stopped: `max_epochs=1` reached." in log and "Epoch 0/0  step 3  " in log

    for name in ("missing", "bogus", "typo"):
        p, out, err = results[name]
        imported, err = imports_and_rest(err)
        results[name] = p, out, err
        assert {"hydra", "torch", "composites_hydra.schema"} <= imported, name  # the listing was read
        assert imported & HEAVY == set(), name

    p, out, err = results["missing"]
    assert p.returncode == 1
    assert "error: no composite chosen: add +composite=NAME, one of: conditional, parallel, sequential" in err

    p, out, err = results["bogus"]
    assert p.returncode == 1
    assert "Could not find 'composite/bogus'" in err and "\tconditional\n\tparallel\n\tsequential" in err

    p, out, err = results["typo"]
    assert p.returncode == 1
    assert "Invalid value 'rase', expected one of [raise, warn, off]\n    full_key: guard" in err


def test_last_ckpt_follows_the_newest_epoch_even_when_the_metric_does_not_improve(tmp_path):
    # lr 0: val/acc never improves after epoch 0, so the best checkpoint stays at step 3; before,
    # last.ckpt (written only with a new best, Lightning >= 2.6) stayed there too and a resume
    # re-trained epochs 1 and 2
    overrides = [*QUICK, "+composite=sequential", "optimizer.lr=0.0", "trainer.max_epochs=3"]
    train.train(compose_train(tmp_path, overrides))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    assert best.name == "best-00-3.ckpt"


def test_resuming_in_the_same_run_directory_keeps_the_earlier_metrics(tmp_path):
    quick = [*QUICK, "+composite=sequential", "trainer.log_every_n_steps=1"]
    train.train(compose_train(tmp_path, quick))
    first_rows = (tmp_path / "logs" / "metrics.csv").read_text()
    train.train(compose_train(tmp_path, [*quick, "trainer.max_epochs=2", "ckpt_path=auto"]))
    assert (tmp_path / "logs" / "metrics.csv").read_text() == first_rows  # untouched
    with open(tmp_path / "logs" / "resume-1" / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_step")] == [3, 4, 5]


def test_without_our_checkpoint_callback_the_monitored_value_is_still_returned(tmp_path):
    value = train.train(compose_train(tmp_path, [*QUICK, "+composite=sequential", "~callbacks.checkpoint"]))
    assert 0.0 <= value <= 1.0  # val/acc, not nan from a monitor-less checkpoint's missing score


def test_a_lightning_trainer_gets_lightnings_callbacks_logger_and_module(tmp_path, built):
    import lightning as L

    overrides = [*QUICK, "+composite=sequential", "trainer._target_=lightning.Trainer"]
    value = train.train(compose_train(tmp_path, overrides))
    ((datamodule, module, trainer),) = built
    assert 0.0 <= value <= 1.0 and type(trainer) is L.Trainer and trainer.global_step == 3
    assert isinstance(module, L.LightningModule) and isinstance(datamodule, L.LightningDataModule)
    assert [type(c).__name__ for c in trainer.callbacks if not isinstance(c, L.Callback)] == []
    assert type(trainer.checkpoint_callback) is L.pytorch.callbacks.ModelCheckpoint
    assert type(trainer.logger) is L.pytorch.loggers.CSVLogger
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "logs" / "metrics.csv").is_file()


def test_compile_compiles_the_model_in_place_and_a_fast_dev_run_trains_it(tmp_path, built):
    overrides = ["+composite=sequential", "trainer.fast_dev_run=true", "trainer.enable_progress_bar=false"]
    value = train.train(compose_train(tmp_path, [*overrides, "compile={backend: eager}"]))
    ((_, module, _),) = built
    assert 0.0 <= value <= 1.0
    assert module.model._compiled_call_impl is not None  # nn.Module.compile: the module itself, no wrapper
    assert [k for k in module.state_dict() if "_orig_mod" in k] == []
