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

import atexit
import faulthandler
import gc
import importlib
import json
import os
import shutil
import tempfile
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.processes import free_port, spawn_until_written

TIMEOUT_S = 420  # every scenario, one after the other, on a busy 2-core machine; a hang fails here
COLLECTIVE_TIMEOUT_S = 90  # a rank waiting longer in one collective of the world (its peer raised) gives up
SHARED = pytest.mark.xdist_group("gloo_ranks")  # the tests reading results: one worker, so one spawn

# name -> (world size, "module:function", arguments, folder, group), in the order the test modules registered them
SCENARIOS: dict[str, tuple[int, str, tuple, str | None, bool]] = {}
_RUN: dict[str, Any] = {}  # the session's spawn, once it ran: its folder and why it stopped early (or None)


def scenario(name: str, world: int, target: str, *args: Any, folder: str | None = None, group: bool = True) -> str:
    """Register ``target`` ("module:function", called with ``args`` on each of ``world`` ranks) as ``name``.

    The function runs inside a default process group of ``world`` ranks and returns what the
    test reads (anything ``json`` writes). With ``folder``, it gets that folder of the run (made
    before the ranks start, shared by the scenarios that name it) as its first argument; the
    test finds it with :func:`folder`. The environment names the rank, the world and a free port
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``) as torchrun does, and is reset after
    the scenario. With ``group=False`` the function gets no process group: the code under test (a
    Lightning strategy, say) starts it from that environment, as in a job torchrun or SLURM started. Test
    modules register at import, so the session's spawn knows every scenario before the first
    test asks. Returns ``name``.
    """
    registered = (world, target, args, folder, group)
    if SCENARIOS.get(name, registered) != registered:
        raise ValueError(
            f"gloo scenario {name!r} is registered already as {SCENARIOS[name]}: give this one another name"
        )
    SCENARIOS[name] = registered
    return name


def run(
    rank: int, ranks: int, port: int, run_folder: str, scenarios: list[tuple[str, int, str, tuple, str | None, bool]]
) -> None:
    """One spawned rank: each scenario of a world above this rank, in a fresh process group, its result to a file.

    Each file is written from this thread before the next scenario, not through a multiprocessing
    queue: a queue's feeder thread can be starved by a C++ destructor that holds the GIL, and the
    result would be lost although the rank reached it.
    """
    faulthandler.dump_traceback_later(TIMEOUT_S - 20, exit=True)  # a hung rank prints where it hangs, then exits
    torch.set_num_threads(1)
    collective = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", port, ranks, rank == 0, timeout=timedelta(seconds=TIMEOUT_S))  # rank 0 serves
    environment = dict(os.environ)
    for index, (name, world, target, args, own_folder, group) in enumerate(scenarios):
        if rank >= world:
            continue
        # every rank of the scenario is here (one that gave the last one up first waits for the others): a fresh group
        if rank == 0:  # the port a group the scenario starts itself meets on (the store holds `port`)
            store.set(f"port/{index}", str(free_port()))
        store.set(f"arrived/{index}/{rank}", "")
        store.wait([f"arrived/{index}/{peer}" for peer in range(world)], timedelta(seconds=TIMEOUT_S))
        os.environ.clear()  # what one scenario set (a rank's variables, say) is not the next one's environment
        os.environ.update(environment, MASTER_ADDR="127.0.0.1", MASTER_PORT=store.get(f"port/{index}").decode())
        os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")  # as torchrun
        try:
            if group:
                group_store = dist.PrefixStore(str(index), store)
                dist.init_process_group("gloo", store=group_store, rank=rank, world_size=world, timeout=collective)
            try:
                module, function = target.split(":")
                call = getattr(importlib.import_module(module), function)  # a rank imports only what it runs
                lead = () if own_folder is None else (str(Path(run_folder, own_folder)),)
                written = {"result": call(*lead, *args)}
            finally:
                gc.collect()  # DDP and pipeline objects die while their process group is alive
                if dist.is_initialized():  # ours, or the one the scenario's code started
                    dist.destroy_process_group()
        except Exception:
            written = {"error": traceback.format_exc()}
        path = Path(run_folder, f"{name}.rank{rank}.json")
        path.with_suffix(".tmp").write_text(json.dumps(written))
        os.replace(path.with_suffix(".tmp"), path)  # the reader never sees half a file


def outcome(name: str) -> list[Any]:
    """Each rank's result of scenario ``name`` (index = rank); the session's spawn runs on the first call.

    Fails the calling test, naming the scenario, when a rank raised (with every rank's traceback)
    or wrote nothing in time (with why the spawn stopped).
    """
    if not _RUN:
        _RUN.update(spawn())
    world = SCENARIOS[name][0]
    written = {}
    for rank in range(world):
        path = Path(_RUN["folder"], f"{name}.rank{rank}.json")
        written[rank] = json.loads(path.read_text()) if path.exists() else {"error": f"no result ({_RUN['failed']})"}
    errors = [f"rank {rank}: {said['error']}" for rank, said in written.items() if "error" in said]
    if errors:  # every rank's, for the one whose peer raised says only that its peer went away
        pytest.fail(f"gloo scenario {name!r} failed on {len(errors)} of {world} ranks:\n" + "\n".join(errors))
    return [written[rank]["result"] for rank in range(world)]


def folder(name: str) -> Path:
    """The folder of the run that scenario ``name`` wrote into (after :func:`outcome` of a scenario)."""
    return Path(_RUN["folder"], SCENARIOS[name][3])


def spawn() -> dict[str, Any]:
    """Spawn the ranks of the largest world once; run every registered scenario, largest world first."""
    run_folder = tempfile.mkdtemp(prefix="gloo_ranks-")
    atexit.register(shutil.rmtree, run_folder, True)  # the session's results and checkpoints go with the session
    order = sorted(SCENARIOS.items(), key=lambda item: -item[1][0])  # stable: registration order within a size
    scenarios = [(name, *registered) for name, registered in order]
    for own_folder in {registered[3] for registered in SCENARIOS.values()} - {None}:
        Path(run_folder, own_folder).mkdir()
    ranks = max(world for world, *_ in SCENARIOS.values())
    paths = [Path(run_folder, f"{name}.rank{rank}.json") for name, (world, *_) in order for rank in range(world)]
    failed = spawn_until_written(run, (ranks, free_port(), run_folder, scenarios), paths, TIMEOUT_S, nprocs=ranks)
    return {"folder": run_folder, "failed": failed}
