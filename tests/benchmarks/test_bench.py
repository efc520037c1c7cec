"""``python -m benchmarks`` runs end to end and writes every section; a dropped-in module is a section.

No timing is asserted: timed tests fail on a busy machine and prove nothing on an idle one; the
numbers are for people.
"""

from __future__ import annotations

import doctest
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import benchmarks
from benchmarks import Row, Settings
from benchmarks.__main__ import _checked

SECTIONS = [
    "composites",
    "guard",
    "diagnosis",
    "routing",
    "lightning",
    "fsdp",
    "expert_parallel",
    "pipeline",
    "compile",
    "gpu",
]


@pytest.mark.slow  # 40-60 s on 2 busy cores: a fresh interpreter, then every section with --quick
def test_quick_bench_writes_every_section_with_numeric_ratios(tmp_path: Path, run_python) -> None:
    out = tmp_path / "bench.json"
    # A subprocess, as a user runs it: the bench sets torch's thread count and warning filters
    # for its whole process, which must not leak into the rest of the test session.
    run = run_python("-m", "benchmarks", "--quick", "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["sections"]) == benchmarks.section_names()  # every section, including any dropped in
    if not torch.cuda.is_available():  # the GPU section says it was skipped, and measures nothing
        assert [(row["name"], row["ratio"]) for row in result["sections"]["gpu"]] == [("skipped: no CUDA device", None)]
    for section, rows in result["sections"].items():
        assert rows, section
        if rows[0]["name"].startswith("skipped: "):  # a section that cannot run here says why, in one row
            assert len(rows) == 1 and rows[0]["ratio"] is None, (section, rows)
            continue
        for row in rows:
            assert isinstance(row["ratio"], (int, float)) and math.isfinite(row["ratio"]), (section, row)
            assert row["met"] in (True, False, None)
    assert "composite / hand-written" in run.stdout  # the table went to stdout
    assert "hand-written copy / hand-written (A/A)" in run.stdout  # with its noise floor


def test_sections_are_found_without_importing_them() -> None:
    before = set(sys.modules)
    names = benchmarks.section_names()
    assert names[: len(SECTIONS)] == SECTIONS  # in reading order; sections dropped in later follow, by name
    assert set(sys.modules) == before  # so a section's heavy imports (Lightning) cost only a run of it


def test_a_module_dropped_into_the_folder_is_a_section(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "aaa_dropped.py").write_text(
        "from benchmarks import Row\n\ndef run(settings):\n    return [Row('aaa_dropped', 'one row', 1.0)]\n"
    )
    (tmp_path / "_helper.py").write_text("raise AssertionError('a helper is never imported as a section')\n")
    (tmp_path / "no_run.py").write_text("X = 1\n")
    monkeypatch.setattr(benchmarks, "__path__", [*benchmarks.__path__, str(tmp_path)])
    for name in ("aaa_dropped", "no_run"):
        monkeypatch.delitem(sys.modules, f"benchmarks.{name}", raising=False)
    names = benchmarks.section_names()
    assert names[: len(SECTIONS)] == SECTIONS and names[len(SECTIONS) :] == ["aaa_dropped", "no_run"]
    settings = Settings.make(quick=True)
    assert benchmarks.load_section("aaa_dropped")(settings) == [Row("aaa_dropped", "one row", 1.0)]
    with pytest.raises(TypeError, match=r"benchmarks/no_run.py is a section but defines no run\(settings\)"):
        benchmarks.load_section("no_run")
    with pytest.raises(ValueError, match=r"no benchmark section 'helper': the sections are composites, guard, .*"):
        benchmarks.load_section("helper")
    with pytest.raises(ValueError, match=r"benchmarks/aaa_dropped.py returned rows of section\(s\) \['guard'\]"):
        _checked("aaa_dropped", [Row("guard", "misfiled", 1.0)])


def test_the_package_examples_run() -> None:
    failed, attempted = doctest.testmod(benchmarks, optionflags=doctest.ELLIPSIS)
    assert (failed, attempted > 0) == (0, True)
