"""Worker processes for the expert-parallel gloo tests (spawned, so importable).

Every rank builds the same model twice (same seed): one stays whole and runs the global batch
alone, the single-process reference; the other has its experts spread over the ranks and runs
this rank's slice of the batch under DDP. Each case records the largest differences.
"""

from __future__ import annotations

import faulthandler
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from composites import Conditional, Sequential
from composites.parallelism import expert_groups, shard_experts

LOCAL_BATCH = 6


def build(top_k: int, capacity_factor: float | None, experts: int = 4) -> Sequential:
    """A Linear, a Conditional of ``experts`` Linear experts behind a Linear gate, a head; seeded."""
    torch.manual_seed(0)
    return Sequential(
        {
            "encoder": nn.Linear(3, 4),
            "moe": Conditional(
                {f"e{i}": nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4)) for i in range(experts)},
                router=nn.Linear(4, experts),
                top_k=top_k,
                capacity_factor=capacity_factor,
            ),
            "head": nn.Linear(4, 2),
        }
    )


def batch(world: int, skew: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * LOCAL_BATCH, 3, generator=g)
    if skew:  # push most samples to one expert, so capacity drops pairs
        x = x.abs()
    return x, torch.randn(world * LOCAL_BATCH, 2, generator=g)


def loss_of(model: nn.Module, moe: Conditional, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y) + 0.1 * moe.load_balancing_loss()


def case(groups, top_k: int, capacity_factor: float | None, optimizer: str, skew: bool) -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    x, y = batch(world, skew)
    reference = build(top_k, capacity_factor)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.5), "adam": lambda p: torch.optim.Adam(p, lr=0.1)}[optimizer]
    ref_opt = make(reference.parameters())
    ref_loss = loss_of(reference, reference.moe, x, y)
    ref_loss.backward()
    ref_gate_grad = reference.moe.router.weight.grad.clone()
    ref_dropped = None if reference.moe.dropped is None else int(reference.moe.dropped)
    ref_opt.step()

    model = build(top_k, capacity_factor)
    ep = shard_experts(model, groups=groups)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ep.expert_parameter_names))
    ddp = DistributedDataParallel(model)
    opt = make(model.parameters())
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    loss = nn.functional.mse_loss(ddp(x[mine]), y[mine]) + 0.1 * model.moe.load_balancing_loss()
    loss.backward()
    ep.reduce_replica_grads(model)
    gate_grad = model.moe.router.weight.grad.clone()
    dropped = None if model.moe.dropped is None else int(model.moe.dropped)
    opt.step()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    full = ep.full_state_dict(model)
    expected = reference.state_dict()
    return {
        "loss": abs(float(mean_loss) - float(ref_loss.detach())),
        "params": max(float((full[k] - v).abs().max()) for k, v in expected.items()),
        "same_keys": sorted(full) == sorted(expected),
        "gate_grad": float((gate_grad - ref_gate_grad).abs().max()),
        "dropped": [dropped, ref_dropped],
        "local_experts": sorted(n for n in model.moe.branch_names if hasattr(model.moe, n)),
    }


def numerics() -> dict:
    groups = expert_groups()
    results = {}
    for top_k in (1, 2):
        for capacity_factor, skew in ((None, False), (1.0, True), (0.5, False)):
            for optimizer in ("sgd", "adam"):
                results[f"top{top_k}-cf{capacity_factor}-{optimizer}"] = case(
                    groups, top_k, capacity_factor, optimizer, skew
                )
    if dist.get_world_size() == 4:  # two copies of each expert shard: expert gradients averaged over the copies
        # capacity counts the expert-parallel group's batch, so only a never-dropping capacity matches
        pairs = expert_groups(2)
        for top_k, capacity_factor in ((1, None), (2, None), (1, 4.0)):
            results[f"ep2-top{top_k}-cf{capacity_factor}-adam"] = case(pairs, top_k, capacity_factor, "adam", False)
    return results


def run(rank: int, world: int, port: int, scenario: str, out_dir: str) -> None:
    faulthandler.dump_traceback_later(150, exit=True)  # a hang dumps its stacks and fails, never waits forever
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {"numerics": numerics}[scenario]()
    finally:
        dist.destroy_process_group()
    tmp = Path(out_dir) / f"rank{rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.rename(Path(out_dir) / f"rank{rank}.json")
