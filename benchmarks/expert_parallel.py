"""Section expert_parallel: experts spread over gloo CPU ranks against DDP's full copy on every rank.

Each rank builds the same mixture (a Linear, a Conditional of 8 MLP experts behind a Linear
gate, top-2, a head) three times: expert-parallel (``shard_experts``, DDP ignoring the experts),
and two DDP copies (the baseline and its A/A copy). It reports:

- parameter memory per rank, expert-parallel / DDP (the experts scale as 1/ranks; the gate,
  encoder and head stay whole);
- train-step time, expert-parallel / DDP, rank 0's wall clock (both sides run the same steps
  in the same order, a barrier before each block; the all-to-alls wait for the slowest rank);
- bytes rank 0 sent to other ranks per step (rows of both all-to-alls in forward, as many
  gradient rows back in backward) against the analytic volume for balanced top-k routing,
  ``4 * batch * top_k * (1 - 1/ranks) * width * 4`` bytes (float32).

On 2 and 4 ranks; both spawn processes, so ``--quick`` skips the section.
The GPU row needs two CUDA devices (NCCL); it is skipped otherwise.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from benchmarks import Row, Settings, Timings, compared
from benchmarks._ranks import TIMEOUT_S, spawn_ranks

EXPERTS, WIDTH, HIDDEN, TOP_K, BATCH = 8, 64, 256, 2, 64


def _model() -> nn.Module:
    from composites import Conditional, Sequential

    torch.manual_seed(0)
    experts = {
        f"e{i}": nn.Sequential(nn.Linear(WIDTH, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, WIDTH)) for i in range(EXPERTS)
    }
    moe = Conditional(experts, router=nn.Linear(WIDTH, EXPERTS), top_k=TOP_K)
    return Sequential({"encoder": nn.Linear(WIDTH, WIDTH), "moe": moe, "head": nn.Linear(WIDTH, 10)})


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _rank(rank: int, world: int, port: int, rounds: int, block: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from composites.parallelism import shard_experts

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)
        x, y = torch.randn(BATCH, WIDTH, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
        ep_model = _model()
        ep = shard_experts(ep_model)
        DDP._set_params_and_buffers_to_ignore_for_model(ep_model, sorted(ep.expert_parameter_names))
        models = {"ep": DDP(ep_model), "ddp": DDP(_model(), find_unused_parameters=True)}
        models["ddp copy"] = DDP(_model(), find_unused_parameters=True)
        optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-4) for name, m in models.items()}

        def step(name: str) -> None:
            optimizers[name].zero_grad(set_to_none=True)
            nn.functional.cross_entropy(models[name](x), y).backward()
            optimizers[name].step()

        for name in models:  # warm-up
            for _ in range(2):
                step(name)
        dispatch = ep_model.moe.dispatcher
        before = dispatch.rows_sent
        samples: dict[str, list[float]] = {name: [] for name in models}
        order, steps = list(models), 0
        for _ in range(rounds):
            order = order[1:] + order[:1]  # rotated the same way on every rank
            for name in order:
                dist.barrier()
                start = time.perf_counter()
                for _ in range(block):
                    step(name)
                samples[name].append((time.perf_counter() - start) / block)
            steps += block
        sent_rows = (dispatch.rows_sent - before) / steps
        if rank == 0:
            memory = {"ep": _param_bytes(ep_model), "ddp": _param_bytes(models["ddp"].module)}
            Path(out).write_text(json.dumps({"samples": samples, "memory": memory, "sent_rows": sent_rows}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _measure(world: int, rounds: int, block: int) -> dict | None:
    return spawn_ranks(_rank, world, (rounds, block))


def _rows(world: int, result: dict | None) -> list[Row]:
    name = f"MoE {EXPERTS} experts top-{TOP_K}, {world} gloo ranks: "
    if result is None:
        return [Row("expert_parallel", f"skipped: {world} gloo ranks did not finish within {TIMEOUT_S}s", math.nan)]
    t = Timings(result["samples"])
    memory = result["memory"]
    expert_share = 1 / world
    analytic = 4 * BATCH * TOP_K * (1 - 1 / world) * WIDTH * 4  # bytes: 2 all-to-alls forward, 2 backward
    measured = 2 * result["sent_rows"] * WIDTH * 4  # forward rows, and as many gradient rows in backward
    note = f"1 thread per rank, batch {BATCH} per rank, width {WIDTH}, hidden {HIDDEN}"
    return [
        Row(
            "expert_parallel",
            name + "parameter memory per rank, EP / DDP",
            memory["ep"] / memory["ddp"],
            note=f"{memory['ep'] / 1e6:.2f} MB vs {memory['ddp'] / 1e6:.2f} MB; experts alone scale as {expert_share:.2f}",
        ),
        compared("expert_parallel", name + "train step, EP / DDP, wall", t, "ep", "ddp", note=note),
        compared("expert_parallel", name + "DDP copy / DDP (A/A), wall", t, "ddp copy", "ddp", note="the noise floor"),
        Row(
            "expert_parallel",
            name + "bytes sent per step, measured / analytic",
            measured / analytic,
            note=f"{measured / 1e3:.1f} kB measured vs {analytic / 1e3:.1f} kB for balanced routing (rank 0)",
        ),
    ]


def run(s: Settings) -> list[Row]:
    """EP against DDP on 2 and 4 gloo ranks (skipped with ``--quick``: it spawns processes)."""
    if s.quick:
        return [
            Row(
                "expert_parallel",
                "skipped: --quick (spawns processes); run python -m benchmarks --only expert_parallel",
                math.nan,
            )
        ]
    rows = []
    for world in (2, 4):
        rows += _rows(world, _measure(world, rounds=20, block=3))
    if not (torch.cuda.is_available() and torch.cuda.device_count() >= 2):
        rows.append(Row("expert_parallel", "skipped: GPU (NCCL) rows need two CUDA devices", math.nan))
    return rows
