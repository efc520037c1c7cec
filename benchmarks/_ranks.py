"""Spawned gloo ranks for the distributed sections: a free port, rank 0's JSON awaited with a deadline."""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

TIMEOUT_S = 600  # a section whose ranks take longer is reported as skipped, not waited on


def free_port() -> int:
    """A TCP port free on this machine now (for the ranks' rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(rank_fn: Callable[..., None], world: int, args: tuple[Any, ...]) -> Any | None:
    """Run ``rank_fn(rank, world, port, *args, out)`` on ``world`` spawned ranks; what rank 0 wrote to ``out``.

    ``None`` when rank 0 wrote nothing: a rank failed, or they did not finish within ``TIMEOUT_S``
    (the ranks left are killed).
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank0.json"
        procs = mp.start_processes(
            rank_fn, args=(world, free_port(), *args, str(out)), nprocs=world, join=False, start_method="spawn"
        )
        deadline = time.monotonic() + TIMEOUT_S
        while not out.exists() and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs.processes):
                break
            time.sleep(0.2)
        for p in procs.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        return json.loads(out.read_text()) if out.exists() else None
