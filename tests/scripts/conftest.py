"""The one finished command-line run that several script tests read (each test that changes a run directory copies it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts.train_helpers import ROOT, SHARED_RUN


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``python scripts/train.py`` with ``SHARED_RUN``, run once: its run directory and its result.

    A real process (most of it is importing torch and Lightning), so the tests that need a
    finished run directory share it; one that writes into a run directory works on a copy.
    """
    cwd = tmp_path_factory.mktemp("finished_run")
    run_dir = cwd / "run"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), *SHARED_RUN, f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    return run_dir, done
