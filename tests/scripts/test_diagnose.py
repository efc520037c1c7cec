"""scripts/diagnose.py: one batch, the guard, a table per sub-model, a PNG of the tree, the exit status."""

from __future__ import annotations

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from composites.presets.models import MLP
from tests import ROOT
from tests.scripts.train_helpers import load_script
from tests.stand_ins import check_png

diagnose_script = load_script("diagnose")


class DetachedMLP(MLP):
    """An MLP branch that hands its features on detached: the bug the diagnosis must show."""

    def forward(self, x):
        return super().forward(x).detach()


def run(tmp_path: Path, capsys, *overrides: str) -> tuple[int, dict[str, str], str]:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])
    status = diagnose_script.diagnose(cfg)
    out = capsys.readouterr().out
    return status, table_rows(out), out


def table_rows(out: str) -> dict[str, str]:
    """sub-model -> status, read off the printed table."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("sub-model"))
    rows = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        parts = line.split()
        rows[parts[0]] = " ".join(parts[8:])
    return rows


def test_healthy_parallel(tmp_path, capsys):
    status, rows, out = run(tmp_path, capsys, "+composite=parallel")
    assert status == 0
    assert rows == {"fuse.image": "ok", "fuse.flat": "ok", "head": "ok"}
    assert "guard: ok" in out
    assert f"gradient flow plot: {tmp_path / 'gradient_flow.png'}" in out
    check_png(tmp_path / "gradient_flow.png", min_height=400)


def test_detached_branch_exits_1_and_names_it(tmp_path, capsys):
    status, rows, out = run(
        tmp_path, capsys, "+composite=parallel", f"model.stages.fuse.branches.flat._target_={__name__}.DetachedMLP"
    )
    assert status == 1
    assert rows == {"fuse.image": "ok", "fuse.flat": "detached", "head": "ok"}
    assert "fuse.flat.net.0.weight" in out  # the guard's per-parameter table follows
    check_png(tmp_path / "gradient_flow.png", min_height=400)


@pytest.mark.parametrize(
    "extra, expected",
    [
        ([], ["+composite=", "conditional", "parallel", "sequential", "scripts/diagnose.py"]),
        (["+composite=sequential", "+foo=1"], ["unknown top-level key(s) foo"]),
    ],
)
def test_a_config_that_cannot_run_exits_2_with_the_reason_not_1_like_a_problem(
    tmp_path, monkeypatch, capsys, extra, expected
):
    monkeypatch.setattr(sys, "argv", ["diagnose.py", *extra, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_info:  # as `python scripts/diagnose.py`, in this process
        runpy.run_path(str(ROOT / "scripts" / "diagnose.py"), run_name="__main__")
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert all(part in message for part in expected), message


@pytest.mark.slow
def test_real_command(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/diagnose.py", "+composite=sequential", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert table_rows(result.stdout) == {"encoder": "ok", "head": "ok"}
    check_png(tmp_path / "gradient_flow.png", min_height=400)
