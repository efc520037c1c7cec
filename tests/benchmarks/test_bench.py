"""scripts/bench.py runs end to end and writes every section. No timing is asserted: timed
tests fail on a busy machine and prove nothing on an idle one; the numbers are for people."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import ROOT  # noqa: E402

SECTIONS = {"composites", "guard", "routing", "lightning", "compile", "gpu"}


@pytest.mark.slow  # ~15-20 s: a fresh interpreter imports torch, Lightning and Dynamo
def test_quick_bench_writes_every_section_with_numeric_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # A subprocess, as a user runs it: the bench sets torch's thread count and warning filters
    # for its whole process, which must not leak into the rest of the test session.
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench.py"), "--quick", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["sections"]) == SECTIONS
    if not torch.cuda.is_available():  # the GPU section says it was skipped, and measures nothing
        assert [(row["name"], row["ratio"]) for row in result["sections"].pop("gpu")] == [
            ("skipped: no CUDA device", None)
        ]
    for section, rows in result["sections"].items():
        assert rows, section
        for row in rows:
            assert isinstance(row["ratio"], (int, float)) and math.isfinite(row["ratio"]), (section, row)
            assert row["met"] in (True, False, None)
    assert "composite / hand-written" in run.stdout  # the table went to stdout
