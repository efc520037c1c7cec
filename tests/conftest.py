"""Fixtures shared by every test folder.

A fixture sets up state for one test and undoes it afterwards (a seeded random stream, Dynamo's
caches, a subprocess in the repository). What only builds or inspects a value (a layer with
known weights, the names of the parameters that got a gradient) is a plain function in
``tests/stand_ins.py`` instead, so module-level builders and spawned workers can use it too.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests import ROOT
from tests.docs_blocks import Command, blocks, commands
from tests.processes import SHARED_SCRIPTS, repository_env, run_shared_scripts


@pytest.fixture
def seeded() -> Iterator[torch.Generator]:
    """torch's global random stream seeded with 0 for this test (and restored after), plus a generator seeded 0."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield torch.Generator().manual_seed(0)


@pytest.fixture
def dynamo_counters() -> Iterator[Any]:
    """Dynamo with no compiled code and zeroed counters (``counters["stats"]["unique_graphs"]``)."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    yield counters
    torch._dynamo.reset()  # no compiled code of this test's models is left to later tests


@pytest.fixture
def tiny_loader() -> Callable[..., DataLoader]:
    """``tiny_loader(n=32, batch_size=8, features=4, classes=3)``: a classification loader, the same data every call."""

    def make(n: int = 32, batch_size: int = 8, features: int = 4, classes: int = 3) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g))
        return DataLoader(data, batch_size=batch_size)

    return make


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess]:
    """``run_python(*args, timeout=120)``: a fresh interpreter in the repository root, as a user runs one there.

    A fresh process for what must not leak into (or be hidden by) this one: imported modules,
    torch's thread count, warning filters.
    """

    def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def shared_scripts(tmp_path_factory) -> Callable[[str], Any]:
    """Every script registered with ``tests.processes.share_script``, run once for the session in one interpreter.

    ``shared_scripts(name)`` is the folder that script wrote into, after it finished on each of
    ``ranks`` (default 0 and 1); else the test fails with what the script said.
    """
    folder = tmp_path_factory.mktemp("shared")
    try:
        said = run_shared_scripts(folder, timeout=240 * len(SHARED_SCRIPTS)).stderr
    except subprocess.TimeoutExpired as expired:
        said = f"the shared run timed out after {expired.timeout} s"

    def ran(name: str, ranks: tuple[int, ...] = (0, 1)) -> Any:
        out = folder / name
        if not all((out / f"finished.rank{rank}").exists() for rank in ranks):
            logs = {p.name: p.read_text()[-3000:] for p in sorted(out.glob("stderr.rank*.txt"))}
            pytest.fail(f"shared script {name!r} did not finish on ranks {ranks}: {logs or said[-3000:]}")
        return out

    return ran


# The README's sweep: its Hydra example, a sweep through train.py, the guard's options and the
# sweep table. Appended to it: a few batches, no PNG (matplotlib is slow to import); the progress
# bar stays as configured (off a terminal it keeps out of the output by itself).
README_SWEEP = ("python", "scripts/train.py", "-m")  # the command's first words
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "~callbacks.gradient_plot",
]


@pytest.fixture(scope="session")
def documented_sweep(tmp_path_factory) -> tuple[Command, Path, subprocess.CompletedProcess]:
    """The README's ``-m`` sweep run end to end once, with ``FAST`` appended: the command, its sweep directory, its result.

    A fresh interpreter with Lightning is the dearest check there is, so one run serves two tests:
    tests/test_docs.py (the command runs as documented) and tests/composites_hydra/test_run_output.py
    (the sweep's table, its summary.csv and each job's train.log).
    """
    found = [
        c
        for b in blocks(ROOT / "README.md")
        if b.language == "bash"
        for c in commands(b)
        if c.words[: len(README_SWEEP)] == README_SWEEP
    ]
    if len(found) != 1:
        pytest.fail(f"the README shows {len(found)} commands starting {' '.join(README_SWEEP)}, not one: {found}")
    cwd = tmp_path_factory.mktemp("documented_sweep")
    done = subprocess.run(
        [sys.executable, str(ROOT / found[0].words[1]), *found[0].words[2:], *FAST, "hydra.sweep.dir=sweep"],
        cwd=cwd,
        env=repository_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return found[0], cwd / "sweep", done


# `make test` runs the suite on two pytest-xdist workers (--dist loadgroup): much of it waits on
# spawned ranks and SLURM jobs. Tests in one group run on one worker, in order: the cluster tests
# (their jobs share the one-machine cluster's CPUs), and the users of each session-wide run (run
# once, not once per worker).
SESSION_RUNS = ("shared_scripts", "finished_run", "documented_sweep")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/cluster/" in item.nodeid:
            item.add_marker(pytest.mark.xdist_group("slurm"))
            continue
        for fixture in SESSION_RUNS:
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(fixture))
                break
