"""examples/my_project: a user's own DataModule and composites, trained by scripts/train.py --config-dir.

The user's package is importable the way a user's own package is: here through PYTHONPATH (a user
would `pip install -e examples/my_project`); nothing in composites or the scripts touches sys.path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from composites.presets import DigitsDataModule
from composites_hydra import build, register_configs
from composites_hydra.build import CONFIG_DIR
from tests import ROOT

EXAMPLE = ROOT / "examples" / "my_project"
SCRIPT = str(ROOT / "scripts" / "train.py")
QUICK = [
    "trainer.enable_progress_bar=false",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


def start(*args: str, cwd, sweep: bool = False) -> subprocess.Popen:
    """scripts/train.py with the example's config dir, its package importable as an installed one would be.

    ``sweep``: a ``-m`` run (the flag goes before every override).
    """
    env = {**os.environ, "PYTHONPATH": str(EXAMPLE), "HYDRA_FULL_ERROR": "0"}
    command = [
        sys.executable,
        SCRIPT,
        *(["-m"] if sweep else []),
        "--config-dir",
        str(EXAMPLE / "configs"),
        *QUICK,
        *args,
    ]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str]:
    out, err = process.communicate(timeout=300)
    return process.returncode, out + err


def weights(checkpoint, prefix: str) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.slow
def test_your_own_data_and_composites_train_through_the_config_dir(tmp_path):
    # Both composites in one -m sweep: Hydra's basic launcher runs the jobs one after the other in
    # one process, which spends most of its time importing torch and Lightning.
    sweep = start(
        "+composite=gated,routed",
        "trainer.max_epochs=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        sweep=True,
    )
    code, output = finish(sweep)
    assert code == 0, output
    printed = output.split("run directory: ")  # each job prints its test table, then its run directory
    for job, name in enumerate(["gated", "routed"]):
        assert "\ntest/acc " in printed[job] and printed[job + 1].startswith(f"{tmp_path / 'sweep' / str(job)}\n")
        assert f"+composite={name}\n" in (tmp_path / "sweep" / str(job) / ".hydra" / "overrides.yaml").read_text()
    earlier = tmp_path / "sweep" / "0" / "checkpoints" / "last.ckpt"  # the gated job's

    # Fine-tune: the fusion stage from the gated run, frozen for the one epoch trained here.
    finetune = start(
        "+composite=finetune",
        "trainer.max_epochs=1",
        f"model.stages.fuse.path={earlier}",
        f"hydra.run.dir={tmp_path / 'finetune'}",
        cwd=tmp_path,
    )
    code, output = finish(finetune)
    assert code == 0, output
    assert "FreezeSubmodels: fuse frozen until epoch 1" in output
    loaded = weights(tmp_path / "finetune" / "checkpoints" / "last.ckpt", "model.fuse.")
    saved = weights(earlier, "model.fuse.")
    assert loaded.keys() == saved.keys() and len(saved) == 10  # 2 branches x 2 Linear x (w, b) + the gate (w, b)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)  # loaded, then frozen: exactly the earlier weights


def compose_with_example(overrides: list[str]):
    """configs/train.yaml composed with the example's config dir on the search path (the compose API's --config-dir)."""
    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose(
            "train",
            overrides=["paths.output_dir=/nonexistent", f"hydra.searchpath=[file://{EXAMPLE / 'configs'}]", *overrides],
        )


def test_a_shipped_composite_with_your_data_passes_your_data_config_whole():
    cfg = compose_with_example(["+composite=parallel", "data=sensors"])
    # the preset chose its digits variant in its defaults list; data= on the command line replaced it whole
    assert OmegaConf.to_container(cfg.data) == {
        "_target_": "my_project.SensorsDataModule",
        "num_classes": 3,
        "samples": 900,
        "views": {"audio": 12, "vibration": 8},
        "as_views": False,
        "batch_size": 32,
        "seed": 0,
    }
    assert cfg.module.metrics.metrics.acc.num_classes == 3 and cfg.model.stages.head.out_features == 3


def test_your_composite_chooses_your_data_variant():
    cfg = compose_with_example(["+composite=gated"])
    assert cfg.data.as_views is True and cfg.model.stages.head.out_features == 3
    assert cfg.model.stages.fuse.branches.audio.in_features == 12


def test_num_classes_comes_from_the_data_config(tmp_path):
    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"paths.output_dir={tmp_path}", "+composite=sequential", "data.num_classes=5"]
        )
    datamodule, module, _ = build(cfg)
    assert isinstance(datamodule, DigitsDataModule)
    assert module.val_metrics["val/acc"].num_classes == 5
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    assert module(x).shape == (64, 5) and int(y.max()) == 4
