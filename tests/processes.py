"""Processes the tests start: a free port, spawned ranks awaited with a deadline, scripts with the repository importable.

Plain functions, no fixtures: module-scoped fixtures and single tests use them alike.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch.multiprocessing as mp

from tests import ROOT

TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py")]  # the training entry point, as a command's first words


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a gloo rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def repository_env() -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH`` (so ``tests.*`` imports in a child)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run_script(path: Path, text: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    """Write ``text`` to ``path`` and run it in a fresh interpreter in its folder, the repository importable."""
    path.write_text(text)
    return subprocess.run(
        [sys.executable, str(path), *args],
        cwd=path.parent,
        env=repository_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def spawn_until_written(
    fn: Callable[..., None], args: tuple, paths: Iterable[Path], timeout_s: float, nprocs: int = 2
) -> str | None:
    """Spawn ``fn(rank, *args)`` on ``nprocs`` ranks and wait until every path in ``paths`` exists; never hangs.

    Returns None when all were written, else why not (the deadline passed, or a rank died first).
    What is under test is what the ranks write: a rank slow to tear its process group down
    afterwards is given 30 s, then killed.
    """
    paths = list(paths)
    procs = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not all(path.exists() for path in paths):
            written = [path.name for path in paths if path.exists()]
            if time.monotonic() > deadline:
                return f"only {written} written within {timeout_s}s"
            codes = [p.exitcode for p in procs.processes]
            if any(code not in (None, 0) for code in codes) and not all(path.exists() for path in paths):
                return f"a rank died (exit codes {codes}) after {written} were written"
            time.sleep(0.2)
    finally:
        for p in procs.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return None
