"""The Makefile's set-up: `make train` brings only what training needs, the other targets the dev extras."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def planned(target: str, tmp_path: Path) -> str:
    """The commands `make TARGET` would run on a machine with no venv yet (nothing is run)."""
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return result.stdout


def test_train_installs_the_package_without_dev_extras(tmp_path):
    commands = planned("train", tmp_path)
    assert "pip install -q --disable-pip-version-check -e ." in commands
    assert "[dev]" not in commands
    assert "scripts/train.py +composite=parallel" in commands


@pytest.mark.parametrize("target", ["test", "lint", "bench"])
def test_dev_targets_install_the_dev_extras(tmp_path, target):
    assert "-e '.[dev]'" in planned(target, tmp_path)
