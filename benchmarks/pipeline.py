"""Section pipeline: the idle ("bubble") fraction of a GPipe step against theory, and each rank's parameter memory.

Two gloo processes (one thread each) hold two balanced stages of a Sequential of wide Linear
layers. For M microbatches a GPipe step keeps each of P stages busy for M of its M + P - 1 time
slots: the theory's bubble is (P - 1) / (M + P - 1). Measured per rank: the step's wall time
(a barrier before each step), against the time the same stage takes for the same M microbatches'
forward and backward alone, on that rank, without any sending; the bubble is 1 - busy / step,
the mean over ranks and rounds (sends and receives count as idle). On a shared, busy CPU the
measurement is noisy and above the theory; the A/A-like row repeats M = 4 as a noise floor.
A GPU section runs the same on two GPUs (NCCL) when they are there.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from benchmarks import Row, Settings
from benchmarks._ranks import TIMEOUT_S, spawn_ranks

WIDTH, LAYERS, BATCH = 512, 8, 64
MICROBATCHES = (1, 4, 8)


def _model() -> nn.Module:
    from composites import Sequential

    torch.manual_seed(0)
    return Sequential({f"layer{i}": nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for i in range(LAYERS)})


def _alone(stage: nn.Module, m: int, shape_in: tuple[int, int], device: torch.device) -> None:
    """The stage's own work for ``m`` microbatches: forward and backward, nothing sent."""
    stage.handoff.recording = False  # no bookkeeping for a guard here
    for _ in range(m):
        h = torch.randn(shape_in, device=device, requires_grad=not stage.is_first)
        out = stage(h)
        result = out[0] if isinstance(out, tuple) else out
        result.sum().backward()


def _rank(rank: int, world: int, port: int, rounds: int, device_type: str, out: str) -> None:
    from composites.parallelism import Pipeline
    from composites.parallelism.pipeline import PipelineStageModule

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=rank, world_size=world)
    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    try:
        found: dict = {"bubble": {}, "params": {}}
        full = _model()
        found["params"]["full"] = sum(p.numel() * p.element_size() for p in full.parameters())
        x = torch.randn(BATCH, WIDTH, device=device)
        y = torch.randn(BATCH, WIDTH, device=device)
        for label, m in [(str(m), m) for m in MICROBATCHES] + [("4 again", 4)]:
            pipeline = Pipeline(
                _model().to(device), nn.functional.mse_loss, n_microbatches=m, schedule="gpipe", device=device
            )
            stage: PipelineStageModule = pipeline.stages[0]
            found["params"][f"rank{rank}"] = sum(p.numel() * p.element_size() for p in stage.parameters())
            # this stage's own work for the same microbatches: forward and backward, nothing sent
            shape_in = (BATCH // m, WIDTH)

            pipeline.step(x, y)  # warm-up: the hand-shake, first sends
            _alone(stage, m, shape_in, device)
            bubbles = []
            for _ in range(rounds):
                dist.barrier()
                sync()
                start = time.perf_counter()
                pipeline.step(x, y)
                sync()
                step = time.perf_counter() - start
                dist.barrier()
                sync()
                start = time.perf_counter()
                _alone(stage, m, shape_in, device)
                sync()
                busy = time.perf_counter() - start
                bubbles.append(max(0.0, 1 - busy / step))
            found["bubble"][label] = statistics.median(bubbles)
            for p in stage.parameters():
                p.grad = None
        gathered: list = [None] * world
        dist.all_gather_object(gathered, found)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(world: int, rounds: int, device_type: str) -> list[dict] | None:
    return spawn_ranks(_rank, world, (rounds, device_type))


def _rows(section: str, ranks: list[dict], world: int, note: str) -> list[Row]:
    rows = []
    for label in [str(m) for m in MICROBATCHES] + ["4 again"]:
        m = int(label.split()[0])
        theory = (world - 1) / (m + world - 1)
        measured = statistics.mean(r["bubble"][label] for r in ranks)
        name = f"GPipe P={world} M={m}: bubble, theory {theory:.3f}" + (" (repeat: noise)" if "again" in label else "")
        rows.append(Row(section, name, measured, note=note))
    full = ranks[0]["params"]["full"]
    for r, found in enumerate(ranks):
        mine = found["params"][f"rank{r}"]
        rows.append(
            Row(
                section,
                f"rank {r} parameter memory / whole model",
                mine / full,
                note=f"{mine / 2**20:.2f} MiB of {full / 2**20:.2f} MiB",
            )
        )
    return rows


def run(s: Settings) -> list[Row]:
    """Bubble fraction at M = 1, 4, 8 and per-rank parameter memory, two ranks (skipped with ``--quick``)."""
    if s.quick:  # two spawned interpreters alone take ~30 s on a busy 2-core machine: not a smoke run
        return [
            Row("pipeline", "skipped: --quick (spawns two processes); python -m benchmarks --only pipeline", math.nan)
        ]
    rows: list[Row] = []
    ranks = _spawn(2, 15, "cpu")
    if ranks is None:
        rows.append(Row("pipeline", f"skipped: the two gloo ranks did not finish within {TIMEOUT_S}s", math.nan))
    else:
        note = f"2 gloo ranks x 1 thread, {LAYERS} Linear({WIDTH}) stages, batch {BATCH}; ratio = measured fraction"
        rows += _rows("pipeline", ranks, 2, note)
    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        ranks = _spawn(2, 30, "cuda")
        if ranks is not None:
            rows += _rows("pipeline", ranks, 2, "GPU: 2 devices, NCCL; ratio = measured fraction")
    else:
        rows.append(Row("pipeline", "skipped: GPU section (needs two CUDA devices)", math.nan))
    return rows
