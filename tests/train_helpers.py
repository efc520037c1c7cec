"""Shared by test_configs.py and test_train.py: import scripts/train.py and compose its config."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import train  # noqa: E402  (scripts/train.py; registers the schema)

# Small and quiet: a few batches, no progress bar.
QUICK = [
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]


def compose_train(output_dir: Path | str, overrides: list[str] = ()) -> DictConfig:
    """Compose configs/train.yaml as the script would, with the run directory set explicitly
    (the compose API has no Hydra run directory to interpolate)."""
    with initialize_config_dir(str(train.CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.output_dir={output_dir}", *overrides])
