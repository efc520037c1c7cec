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


# Scripts registered here run one after the other in ONE interpreter (its Lightning DDP launch
# included: the ranks Lightning starts for the first script's Trainer serve every later one), so
# a pair of ranks that costs most of its time importing torch and Lightning serves several tests.
SHARED_SCRIPTS: dict[str, str] = {}

SHARED_RUNNER = """
import contextlib, os, sys, traceback
rank = os.environ.get("LOCAL_RANK", "0")  # Lightning starts rank 1 with LOCAL_RANK set; rank 0 has none yet
for name in {names!r}:
    folder = os.path.join({folder!r}, name)
    script = os.path.join(folder, "script.py")
    sys.argv[1:] = [folder]  # a script reads its output folder from sys.argv[1]; rank 1 ignores its arguments
    with open(os.path.join(folder, f"stderr.rank{{rank}}.txt"), "w") as err, contextlib.redirect_stderr(err):
        try:
            exec(compile(open(script).read(), script, "exec"), {{"__name__": "__main__", "__file__": script}})
            ended = "finished"
        except BaseException:
            traceback.print_exc()
            ended = "failed"
    open(os.path.join(folder, f"{{ended}}.rank{{rank}}"), "w").close()
    if ended == "failed":
        sys.exit(f"{{name}} failed on rank {{rank}}: see {{folder}}/stderr.rank{{rank}}.txt")
"""


def share_script(name: str, text: str) -> str:
    """Register ``text`` (a script that writes into the folder ``sys.argv[1]`` names) for :func:`run_shared_scripts`.

    Test modules register at import, so every script of the session is known before the first
    test asks for the shared run. Returns ``name``.
    """
    SHARED_SCRIPTS[name] = text
    return name


def run_shared_scripts(folder: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run every registered script, in registration order, in one fresh interpreter; each gets ``folder/<name>``.

    A script that ends writes ``finished.rank<r>`` (or ``failed.rank<r>``, its traceback in
    ``stderr.rank<r>.txt``) into its folder per rank; the run stops at the first failure.
    """
    for name, text in SHARED_SCRIPTS.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "script.py").write_text(text)
    runner = SHARED_RUNNER.format(names=list(SHARED_SCRIPTS), folder=str(folder))
    return run_script(folder / "shared_runner.py", runner, timeout=timeout)
