"""One spawn of gloo ranks serves every distributed scenario of the session, each on its own world size.

A spawned rank spends ~2.5 CPU-s importing torch and composites before it steps anything, so
the pipeline, expert-parallel and DDP-guard tests do not each spawn their own ranks: a test
module registers its scenarios at import (:func:`scenario`), and the first test that asks for a
result (:func:`outcome`) spawns as many ranks as the largest registered world needs, once per
session (per pytest-xdist worker: the tests that read results carry :data:`SHARED`, which puts
them on one worker).

The ranks run the scenarios largest world first (ranks above a scenario's world skip it, and
leave when none is left for them). Each scenario gets a fresh default process group of its
world size, so library code that uses the default group runs as it does in a real job, and a
scenario that breaks, even one that leaves a rank waiting in a collective until the group's
timeout, hands the next one a clean group. Each rank writes each scenario's result, or its
traceback, to a file of its own before it starts the next: a failing scenario fails its own
tests, with its traceback, and hides no other scenario's result.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import json
import os
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.processes import free_port, spawn_until_written

TIMEOUT_S = 420  # every scenario, one after the other, on a busy 2-core machine; a hang fails here
COLLECTIVE_TIMEOUT_S = 90  # a rank waiting longer in one collective (its peer raised or hung) gives the scenario up
SHARED = pytest.mark.xdist_group("gloo_ranks")  # the tests reading results: one worker, so one spawn

SCENARIOS: dict[str, tuple[int, str, tuple]] = {}  # name -> (world size, "module:function", arguments)
_RUN: dict[str, Any] = {}  # the session's spawn, once it ran: its folder and why it stopped early (or None)


def scenario(name: str, world: int, target: str, *args: Any) -> str:
    """Register ``target`` ("module:function", called with ``args`` on each of ``world`` ranks) as ``name``.

    The function runs inside a default process group of ``world`` ranks and returns what the
    test reads (anything ``json`` writes). Test modules register at import, so the session's
    spawn knows every scenario before the first test asks. Returns ``name``.
    """
    SCENARIOS[name] = (world, target, args)
    return name


def run(rank: int, ranks: int, port: int, folder: str, scenarios: list[tuple[str, int, str, tuple]]) -> None:
    """One spawned rank: each scenario of a world above this rank, in a fresh process group, its result to a file."""
    import torch
    import torch.distributed as dist

    faulthandler.dump_traceback_later(TIMEOUT_S - 20, exit=True)  # a hung rank prints where it hangs, then exits
    torch.set_num_threads(1)
    timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, ranks, rank == 0, timeout=timeout)  # rank 0 serves; every group meets here
    for index, (name, world, target, args) in enumerate(scenarios):
        if rank >= world:
            continue
        try:
            module, function = target.split(":")
            call = getattr(importlib.import_module(module), function)  # a rank imports only what its scenarios use
            group_store = dist.PrefixStore(str(index), store)
            dist.init_process_group("gloo", store=group_store, rank=rank, world_size=world, timeout=timeout)
            try:
                written = {"result": call(*args)}
            finally:
                gc.collect()  # DDP and pipeline objects die while their process group is alive
                dist.destroy_process_group()
        except Exception:
            written = {"error": traceback.format_exc()}
        path = Path(folder, f"{name}.rank{rank}.json")
        path.with_suffix(".tmp").write_text(json.dumps(written))
        os.replace(path.with_suffix(".tmp"), path)  # the reader never sees half a file


def outcome(name: str) -> list[Any]:
    """Each rank's result of scenario ``name`` (index = rank); the session's spawn runs on the first call.

    Fails the calling test, naming the scenario, when a rank raised (with its traceback) or wrote
    nothing in time (with why the spawn stopped).
    """
    if not _RUN:
        _RUN.update(spawn())
    world = SCENARIOS[name][0]
    results = []
    for rank in range(world):
        path = Path(_RUN["folder"], f"{name}.rank{rank}.json")
        if not path.exists():
            pytest.fail(f"gloo scenario {name!r}: rank {rank} wrote no result ({_RUN['failed']})")
        written = json.loads(path.read_text())
        if "error" in written:
            pytest.fail(f"gloo scenario {name!r} raised on rank {rank}:\n{written['error']}")
        results.append(written["result"])
    return results


def spawn() -> dict[str, Any]:
    """Spawn the ranks of the largest world once; run every registered scenario, largest world first."""
    folder = tempfile.mkdtemp(prefix="gloo_ranks-")
    order = sorted(SCENARIOS.items(), key=lambda item: -item[1][0])  # stable: registration order within a size
    scenarios = [(name, world, target, args) for name, (world, target, args) in order]
    ranks = max(world for _, world, _, _ in scenarios)
    paths = [Path(folder, f"{name}.rank{rank}.json") for name, world, _, _ in scenarios for rank in range(world)]
    failed = spawn_until_written(run, (ranks, free_port(), folder, scenarios), paths, TIMEOUT_S, nprocs=ranks)
    return {"folder": folder, "failed": failed}
