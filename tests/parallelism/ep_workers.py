"""The expert-parallel gloo tests' scenarios, run by ``tests.gloo_ranks``'s spawned ranks (so importable).

Every rank builds the same model twice (same seed): one stays whole and runs the global batch
alone, the single-process reference; the other has its experts spread over the ranks and runs
this rank's slice of the batch under DDP. Each case records the largest differences.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from composites import Conditional, GradientFlowError, GradientGuard, Parallel, Sequential
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


def composed() -> Sequential:
    """Two spread Conditionals: one inside a Parallel, with a Conditional nested in one of its experts
    (that one stays whole on the expert's rank), and one in capacity mode further on."""
    torch.manual_seed(0)
    inner = Conditional({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)}, router=nn.Linear(4, 2))
    experts = {"e0": inner, **{f"e{i}": nn.Linear(4, 4) for i in range(1, 4)}}
    return Sequential(
        {
            "encoder": nn.Linear(3, 4),
            "both": Parallel(
                {"moe": Conditional(experts, router=nn.Linear(4, 4), top_k=2), "skip": nn.Linear(4, 4)}, combine="sum"
            ),
            "capped": Conditional(
                {f"c{i}": nn.Linear(4, 4) for i in range(4)}, router=nn.Linear(4, 4), capacity_factor=0.75
            ),
            "head": nn.Linear(4, 2),
        }
    )


def composed_case() -> dict:
    world, rank = dist.get_world_size(), dist.get_rank()
    x, y = batch(world)

    def loss(model: nn.Module, core: Sequential, rows: slice) -> torch.Tensor:
        fit = nn.functional.mse_loss(model(x[rows]), y[rows])
        return fit + 0.1 * (core.both.moe.load_balancing_loss() + core.capped.load_balancing_loss())

    reference = composed()
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.1)
    ref_loss = loss(reference, reference, slice(None))
    ref_loss.backward()
    ref_opt.step()
    model = composed()
    ep = shard_experts(model, groups=expert_groups())
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ep.expert_parameter_names))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    ddp = DistributedDataParallel(model)  # held: its reducer averages the gradients in backward
    local_loss = loss(ddp, model, mine)
    local_loss.backward()
    opt.step()
    mean_loss = local_loss.detach().clone()
    dist.all_reduce(mean_loss)
    full = ep.full_state_dict(model)
    return {
        "loss": abs(float(mean_loss) / world - float(ref_loss.detach())),
        "params": max(float((full[k] - v).abs().max()) for k, v in reference.state_dict().items()),
        "same_keys": sorted(full) == sorted(reference.state_dict()),
        "gate_grad": max(
            float((p.grad - reference.get_parameter(n).grad).abs().max())
            for n, p in model.named_parameters()
            if ".router." in n  # both gates: DDP averaged theirs, as the reference's mean loss does
        ),
        "dropped": [None if m.capped.dropped is None else int(m.capped.dropped) for m in (model, reference)],
        "spread": [s.path for s in ep.sharded],
        "local_experts": sorted(n for n in model.both.moe.branch_names if hasattr(model.both.moe, n)),
    }


def numerics_four() -> dict:
    """Four ranks: fewer cases (each costs four busy processes), one of them with copies of the expert shards."""
    groups = expert_groups()
    results = {
        "top1-cfNone-adam": case(groups, 1, None, "adam", False),
        "top2-cf0.5-adam": case(groups, 2, 0.5, "adam", False),
    }
    # two copies of each expert shard: expert gradients averaged over the copies
    results["ep2-top2-cfNone-adam"] = case(expert_groups(2), 2, None, "adam", False)
    return results


def numerics() -> dict:
    groups = expert_groups()
    results = {}
    results["top1-cfNone-sgd"] = case(groups, 1, None, "sgd", False)
    results["composed"] = composed_case()
    for top_k in (1, 2):
        for capacity_factor, skew in ((None, False), (1.0, True), (0.5, False)):
            results[f"top{top_k}-cf{capacity_factor}-adam"] = case(groups, top_k, capacity_factor, "adam", skew)
    return results


class Cut(nn.Module):
    """An expert that detaches its own layer's output: ``fc`` never gets a gradient where it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).detach() + x


def guarded_steps(model: Sequential, steps: int, starved_after: int | None = None) -> list:
    """The guard's verdict on this rank after each of ``steps`` expert-parallel DDP steps."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = shard_experts(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ep.expert_parameter_names))
    ddp = DistributedDataParallel(model)
    guard = GradientGuard(model, starved_after=starved_after)
    x, y = batch(world)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    outcome = []
    for _ in range(steps):
        nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
        try:
            report = guard.check()
            outcome.append(["ok", report.inactive_names])
        except GradientFlowError as error:
            outcome.append(["error", [[p.parameter, p.module, p.cause, p.where] for p in error.problems]])
            break
    return outcome


def guard() -> dict:
    """Three guarded scenarios in one process group."""
    results = {}
    results["healthy"] = guarded_steps(build(2, None), 2)
    dead = build(1, None)  # the gate sends every sample to e0 (rank 0's): the others get nothing anywhere
    with torch.no_grad():
        dead.moe.router.weight.zero_()
        dead.moe.router.bias.copy_(torch.tensor([9.0, 0.0, 0.0, 0.0]))
    results["dead"] = guarded_steps(dead, 3, starved_after=2)
    cut = build(2, None)
    cut.moe.e3 = Cut()  # held by the last rank
    results["cut"] = guarded_steps(cut, 1)
    capacity_dead = build(1, 1.0)  # capacity mode: every expert runs on its slots, zero rows or not
    with torch.no_grad():
        capacity_dead.moe.router.weight.zero_()
        capacity_dead.moe.router.bias.copy_(torch.tensor([9.0, 0.0, 0.0, 0.0]))
    results["capacity_dead"] = guarded_steps(capacity_dead, 1)
    return results


def checkpoint() -> dict:
    """The strategy's checkpoint side on real collectives: save, resume exactly, refuse a changed size."""
    from composites.training import ExpertParallelStrategy

    world, rank = dist.get_world_size(), dist.get_rank()
    x, y = batch(world)
    mine = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)

    def trained(strategy: ExpertParallelStrategy) -> tuple[Sequential, torch.optim.Optimizer]:
        model = build(2, None)
        strategy.expert_parallel = shard_experts(model)
        strategy._lightning_module = model  # what Lightning's connect() sets; no Trainer here
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            model, sorted(strategy.expert_parallel.expert_parameter_names)
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
        strategy._optimizers = [optimizer]
        return model, optimizer

    def step(model: Sequential, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad()
        ddp = DistributedDataParallel(model)
        nn.functional.mse_loss(ddp(x[mine]), y[mine]).backward()
        optimizer.step()

    cpus = [torch.device("cpu")] * world
    saving = ExpertParallelStrategy(parallel_devices=cpus)
    model, optimizer = trained(saving)
    step(model, optimizer)
    saved = {
        "state_dict": saving.lightning_module_state_dict(),
        "optimizer_states": [saving.optimizer_state(optimizer)],
    }
    resumed_strategy = ExpertParallelStrategy(parallel_devices=cpus)
    resumed, resumed_optimizer = trained(resumed_strategy)
    resumed_strategy.load_model_state_dict(saved)
    resumed_strategy.load_optimizer_state_dict(saved)
    step(model, optimizer)
    step(resumed, resumed_optimizer)
    whole = build(2, None)
    whole.load_state_dict(saved["state_dict"])  # the checkpoint is the single-process model
    other = dict(saved["optimizer_states"][0]["expert_parallel"], expert_parallel_size=1)
    try:
        resumed_strategy.load_optimizer_state_dict({**saved, "optimizer_states": [{"expert_parallel": other}]})
        refused = ""
    except ValueError as error:
        refused = str(error)
    return {
        "resumed_equal": all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values())
        ),
        "same_local_keys": list(model.state_dict()) == list(resumed.state_dict()),
        "saved_keys": sorted(saved["state_dict"]) == sorted(whole.state_dict()),
        "refused": refused,
    }
