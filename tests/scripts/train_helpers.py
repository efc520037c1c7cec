"""Shared by test_configs.py and test_train.py: import scripts/train.py and compose its config."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from composites_hydra.build import CONFIG_DIR
from tests import ROOT


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` as a module (it registers the config schema)."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = load_script("train")

# Small and quiet: a few batches, no progress bar.
QUICK = [
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]

# The one finished command-line run several tests read (tests/scripts/conftest.py: finished_run):
# QUICK with the progress bar as configured (off a terminal it must stay out of the output by
# itself), and the guard's options from the command line as the docs write them.
SHARED_RUN = [
    "+composite=conditional",
    "module.guard.may_skip=[experts.*]",
    "guard=warn",
    *[o for o in QUICK if not o.startswith("trainer.enable_progress_bar")],
]


def compose_train(output_dir: Path | str, overrides: list[str] = ()) -> DictConfig:
    """Compose configs/train.yaml as the script would, with the run directory set explicitly
    (the compose API has no Hydra run directory to interpolate)."""
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])
