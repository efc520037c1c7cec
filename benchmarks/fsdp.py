"""Section fsdp: the train step with ``guard.check()`` against none, under FSDP2 on two gloo CPU processes.

Each rank shards copies of one composite (``shard_composite``: one unit per stage, then the
root) and runs the same train step with the guard's check after backward and without.
Both ranks run the cases in the same order and the same number of times (a collective
needs every rank), a barrier before each block; the per-round ratios are rank 0's, on its
CPU time (the work the guard adds) and on the wall clock (a step also waits for the other
rank in the collectives, which on a busy machine is most of it).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks import Row, Settings, Timings, compared, sequential_pair, train_step
from benchmarks._ranks import TIMEOUT_S, spawn_ranks

TARGET = 1.02  # as the single-process guard section's medium model: the check costs about 1%


def _rank(rank: int, world: int, port: int, size: str, rounds: int, block: int, out: str) -> None:
    """Time every case on this rank; rank 0 writes the per-block seconds to ``out``."""
    from torch.distributed.device_mesh import init_device_mesh

    from composites import GradientGuard
    from composites.training.strategies.sharding import shard_composite

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        torch.manual_seed(0)
        model, _, x, y = sequential_pair(size)
        copies = {name: copy.deepcopy(model) for name in ("none", "none copy", "guard")}
        for m in copies.values():
            shard_composite(m, mesh)
        guard = GradientGuard(copies["guard"])
        cases = {
            "none": train_step(copies["none"], x, y),
            "none copy": train_step(copies["none copy"], x, y),
            "guard": train_step(copies["guard"], x, y, guard.check),
        }
        samples: dict[str, list[float]] = {f"{name}{clock}": [] for name in cases for clock in ("", " cpu")}
        for step in cases.values():  # warm-up: lazy init, first all-gathers
            for _ in range(2):
                step()
        order = list(cases)
        for _ in range(rounds):
            order = order[1:] + order[:1]  # rotated the same way on every rank
            for name in order:
                dist.barrier()
                start, cpu = time.perf_counter(), time.process_time()
                for _ in range(block):
                    cases[name]()
                samples[name].append((time.perf_counter() - start) / block)
                samples[f"{name} cpu"].append((time.process_time() - cpu) / block)
        if rank == 0:
            Path(out).write_text(json.dumps(samples))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(s: Settings) -> list[Row]:
    """Guard on / off per train step of the medium Sequential, sharded over two ranks (skipped with ``--quick``)."""
    if s.quick:  # two spawned interpreters alone take ~30 s on a busy 2-core machine: not a smoke run
        return [Row("fsdp", "skipped: --quick (spawns two processes); run python -m benchmarks --only fsdp", math.nan)]
    size, rounds, block = "medium", 60, 3
    found = spawn_ranks(_rank, 2, (size, rounds, block))
    if found is None:
        return [Row("fsdp", f"skipped: the two gloo ranks did not finish within {TIMEOUT_S}s", float("nan"))]
    t = Timings(found)
    note = f"2 gloo ranks x 1 thread, batch {sequential_pair(size)[2].shape[0]} per rank"
    name = f"Sequential {size}, FSDP2 x2: "
    return [
        compared("fsdp", name + "check / none, rank-0 CPU", t, "guard cpu", "none cpu", TARGET, note + ", CPU time"),
        compared("fsdp", name + "none copy / none (A/A), CPU", t, "none copy cpu", "none cpu", note="the noise floor"),
        compared("fsdp", name + "check / none, wall", t, "guard", "none", note=note + ", wall clock: waits included"),
        compared("fsdp", name + "none copy / none (A/A), wall", t, "none copy", "none", note="the noise floor"),
    ]
