"""Expert parallelism: a Conditional's branches (experts) spread over ranks, samples moved by all-to-all.

Each rank routes its own samples with the (replicated, data-parallel) gate, sends every
(sample, expert) pair's row to the rank that holds the expert, runs its own experts on what it
received, and sends the outputs back, where they are weighted by the gate as in the
single-process model. The numbers are those of the single-process model on the global batch
(the concatenation of the ranks' batches) up to float rounding:

- Default routing (``capacity_factor=None``): the ranks exchange per-expert counts (one small
  all-to-all and one host read), then move exactly the routed rows (a variable-size all-to-all).
- ``capacity_factor``: every expert has the capacity the single-process model gives it on the
  global batch, ``ceil(capacity_factor * global_batch * top_k / experts)`` slots. The ranks
  all-gather their per-expert counts (a tensor, no host read), so each pair gets the slot it has
  in the single-process model: the same pairs are dropped. Each rank sends a fixed-size block of
  slots per expert (zero where the pair is another rank's); the owner sums the blocks (each slot
  filled by at most one rank), runs the expert on exactly the single-process slots and sends
  them back. Static shapes, no host read; it moves ``experts * capacity`` rows per rank, the
  expert-parallel size times what slots per rank would move, the price of dropping exactly the
  pairs the single-process model drops. Every rank must have the same local batch size
  (Lightning's ``DistributedSampler`` pads to that).

Gradients: an expert's gradient arrives from every rank's loss through the all-to-all's
backward, so it is the sum over the expert-parallel group of per-rank means; a hook divides it
by the group size, and copies of an expert on other groups (data-parallel replicas of the
expert shard) are averaged by :meth:`ExpertParallel.reduce_replica_grads`. Data parallelism
(DDP) averages everything else and must ignore the expert parameters
(:attr:`ExpertParallel.expert_parameter_names`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from ..modules import Conditional, is_under, join_name


@dataclass(frozen=True)
class ExpertGroups:
    """The process groups of expert parallelism.

    Ranks ``[i * ep_size, (i + 1) * ep_size)`` form expert-parallel group ``i``: together they
    hold every expert once. Ranks with the same position in their group hold the same experts
    and form a replica group (``None`` when the expert-parallel group spans all ranks).
    """

    world_size: int
    ep_size: int
    ep_rank: int
    ep_group: Any
    replica_size: int
    replica_group: Any
    world_group: Any


def expert_groups(ep_size: int | None = None) -> ExpertGroups:
    """Make the expert-parallel and replica process groups (every rank calls it, in the same order).

    Args:
        ep_size: ranks that share one copy of the experts (``None``: all ranks). Must divide the
            world size.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("expert parallelism needs an initialised torch.distributed process group")
    world, rank = dist.get_world_size(), dist.get_rank()
    size = world if ep_size is None else ep_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world % size:
        raise ValueError(
            f"expert_parallel_size={ep_size!r} must be a positive number of ranks dividing the world size {world} "
            f"(one of {[d for d in range(1, world + 1) if world % d == 0]}), or null for all ranks"
        )
    # new_group is collective over the whole world: every rank makes every group, in one order
    ep_group = replica_group = None
    for start in range(0, world, size):
        group = dist.new_group(list(range(start, start + size)))
        if start <= rank < start + size:
            ep_group = group
    replicas = world // size
    if replicas > 1:
        for first in range(size):
            group = dist.new_group(list(range(first, world, size)))
            if rank % size == first:
                replica_group = group
    world_group = dist.new_group(list(range(world)))  # its own communicator: never interleaves with DDP's
    return ExpertGroups(world, size, rank % size, ep_group, replicas, replica_group, world_group)


class ExpertDispatch:
    """A Conditional's dispatch over an expert-parallel group (set as ``Conditional.dispatcher``).

    Args:
        names: all branch names of the Conditional, in order (the global expert ids).
        groups: the process groups; this rank holds experts ``[ep_rank * E / ep_size, ...)``.
    """

    def __init__(self, names: Sequence[str], groups: ExpertGroups):
        self.names, self.groups = tuple(names), groups
        per_rank = len(self.names) // groups.ep_size
        self.local = self.names[groups.ep_rank * per_rank : (groups.ep_rank + 1) * per_rank]
        # rows this rank sent to other ranks in forwards so far, both all-to-alls (the backward sends
        # as many gradient rows back); host-side counts, for the benchmark's traffic
        self.rows_sent = 0

    def __call__(
        self,
        branches: Mapping[str, Callable[[Tensor], Tensor]],
        scores: Tensor,
        x: Tensor,
        top_k: int,
        capacity_factor: float | None,
    ) -> tuple[Tensor, Tensor, Tensor, Sequence[str], Tensor | None]:
        experts = [branches[name] for name in self.local]
        if capacity_factor is None:
            *result, sent = _dispatch_sized(experts, self.local, scores, x, top_k, self.groups)
        else:
            *result, sent = _dispatch_with_capacity(experts, self.local, scores, x, top_k, capacity_factor, self.groups)
        self.rows_sent += sent
        return tuple(result)

    def load_balancing_loss(self, probs: Tensor, chosen: Tensor) -> Tensor:
        """The Switch loss with the fractions ``f_e`` counted over every rank's samples.

        ``P_e`` stays this rank's mean gate probability: data parallelism averages the ranks'
        losses and gradients, and the mean over ranks of ``E * sum_e f_e * P_e`` (equal local
        batches) is the single-process loss on the global batch, gradients included.
        """
        n = probs.shape[1]
        flat = chosen.reshape(-1)
        counts = probs.new_zeros(n).scatter_add(0, flat, torch.ones_like(flat, dtype=probs.dtype)).detach()
        counts = funcol.all_reduce(counts, "sum", self.groups.world_group)
        total = counts.sum()
        if chosen.numel() == 0:
            return probs.sum() * 0
        fraction = counts / total
        return n * (fraction * probs.mean(dim=0)).sum()


def _a2a(rows: Tensor, output_sizes: list[int] | None, input_sizes: list[int] | None, group: Any) -> Tensor:
    """Autograd-aware all-to-all: its backward sends the gradients back the way the rows came."""
    return funcol.all_to_all_single_autograd(rows.contiguous(), output_sizes, input_sizes, group)


def _keep_in_graph(y: Tensor, received: Tensor) -> Tensor:
    """Make the rows sent back part of the graph on every rank while gradients are on.

    The all-to-alls' backward is a collective: a rank whose returned rows (or received rows)
    are outside its loss's graph would skip it and leave the others waiting. ``received.sum()``
    of an empty tensor is 0, and adding it to an empty ``y`` changes nothing.
    """
    if not torch.is_grad_enabled():
        return y
    if received.requires_grad and received.numel() == 0:
        y = y + received.sum()
    return y if y.requires_grad else y.detach().requires_grad_()


def _dispatch_sized(
    experts: Sequence[Callable[[Tensor], Tensor]],
    local: Sequence[str],
    scores: Tensor,
    x: Tensor,
    top_k: int,
    groups: ExpertGroups,
) -> tuple[Tensor, Tensor, Tensor, list[str], None, int]:
    size, per_rank, group = groups.ep_size, len(local), groups.ep_group
    n, batch = scores.shape[1], scores.shape[0]
    probs = scores.softmax(dim=-1)  # (batch, experts)
    weight, chosen = probs.topk(top_k, dim=-1)  # (batch, top_k) each
    flat = chosen.reshape(-1)  # (batch * top_k,): the expert of each pair
    order = flat.argsort(stable=True)  # grouped by expert, so by the rank that holds it
    sample = order // top_k
    counts = torch.bincount(flat, minlength=n)  # (experts,): this rank's pairs per expert
    # (size * per_rank,): for each source rank, its pairs for each of this rank's experts
    incoming = funcol.all_to_all_single(counts, None, None, group)
    sizes = torch.cat([counts, incoming]).tolist()  # the one host read
    sent, got = sizes[:n], sizes[n:]
    send_sizes = [sum(sent[r * per_rank : (r + 1) * per_rank]) for r in range(size)]
    recv_sizes = [sum(got[r * per_rank : (r + 1) * per_rank]) for r in range(size)]
    received = _a2a(x[sample], recv_sizes, send_sizes, group)  # (sum got, ...): source-major, then expert
    pieces = received.split(got)  # piece r * per_rank + e: source r's rows for local expert e
    outputs: dict[int, list[Tensor]] = {}
    ran = []
    for e, expert in enumerate(experts):
        rows = [pieces[r * per_rank + e] for r in range(size)]
        if sum(got[r * per_rank + e] for r in range(size)) == 0:
            continue
        y = expert(torch.cat(rows))  # one call on every rank's rows for it
        outputs[e] = list(y.split([got[r * per_rank + e] for r in range(size)]))
        ran.append(local[e])
    if outputs:
        sample_out = next(iter(outputs.values()))[0]
        empty = sample_out.new_zeros((0, *sample_out.shape[1:]))
        back = torch.cat([outputs[e][r] if e in outputs else empty for r in range(size) for e in range(per_rank)])
    else:  # nothing came here: the rows' shape from an empty call, outside the graph
        with torch.no_grad():
            back = experts[0](received[:0])
    back = _keep_in_graph(back, received)
    y = _a2a(back, send_sizes, recv_sizes, group)  # (batch * top_k, ...): in the order sent, sorted by expert
    w = weight.reshape(-1)[order].to(y.dtype).reshape(-1, *([1] * (y.dim() - 1)))
    out = y.new_zeros((batch, *y.shape[1:])).index_add(0, sample, y * w)
    me = groups.ep_rank
    sent_rows = sum(send_sizes) - send_sizes[me] + sum(recv_sizes) - recv_sizes[me]
    return out, probs, chosen, ran, None, sent_rows


def _dispatch_with_capacity(
    experts: Sequence[Callable[[Tensor], Tensor]],
    local: Sequence[str],
    scores: Tensor,
    x: Tensor,
    top_k: int,
    capacity_factor: float,
    groups: ExpertGroups,
) -> tuple[Tensor, Tensor, Tensor, Sequence[str], Tensor, int]:
    size, per_rank, group = groups.ep_size, len(local), groups.ep_group
    batch, n = scores.shape
    capacity = max(1, math.ceil(capacity_factor * batch * size * top_k / n))  # the global batch's
    probs = scores.softmax(dim=-1)  # (batch, experts)
    weight, chosen = probs.topk(top_k, dim=-1)  # (batch, top_k) each
    flat = chosen.reshape(-1)  # (batch * top_k,)
    hits = flat[:, None] == torch.arange(n, device=flat.device)  # (batch * top_k, experts)
    every = funcol.all_gather_single(hits.sum(0), 0, group).reshape(size, n)  # (ranks, experts): pairs
    before = every[: groups.ep_rank].sum(0)  # (experts,): pairs of the ranks before this one
    # the position each pair has in its expert in the single-process model (earlier samples win)
    position = (hits.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1) + before[flat]
    kept = position < capacity
    overflow = n * capacity  # one spare slot collects every dropped pair, then is cut off
    slot = torch.where(kept, flat * capacity + position, overflow)
    pair_sample = torch.arange(batch * top_k, device=flat.device) // top_k
    # slots this rank did not fill point at row `batch`: an appended zero row in, a discarded row out
    slot_sample = torch.full((overflow + 1,), batch, device=flat.device).scatter(0, slot, pair_sample)[:overflow]
    slot_weight = weight.new_zeros(overflow + 1).scatter(0, slot, weight.reshape(-1))[:overflow]
    padded = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])  # (batch + 1, ...)
    blocks = _a2a(padded[slot_sample], None, None, group)  # (ranks * per_rank * capacity, ...)
    # each slot was filled by at most one rank, the others sent zeros: the sum is the single-process slots
    slots = blocks.reshape(size, per_rank * capacity, *blocks.shape[1:]).sum(0)  # (per_rank * capacity, ...)
    y = torch.cat([expert(chunk) for expert, chunk in zip(experts, slots.split(capacity))])
    # every rank gets every expert's slots back: (ranks * per_rank * capacity, ...) = (experts * capacity, ...)
    y = _a2a(y.expand(size, *y.shape).reshape(size * y.shape[0], *y.shape[1:]), None, None, group)
    w = slot_weight.to(y.dtype).reshape(-1, *([1] * (y.dim() - 1)))
    out = y.new_zeros((batch + 1, *y.shape[1:])).index_add(0, slot_sample, y * w)[:batch]
    dropped = funcol.wait_tensor(funcol.all_reduce((~kept).sum(), "sum", group))  # over every rank of the group
    return out, probs, chosen, local, dropped, 2 * (size - 1) * per_rank * capacity


@dataclass(frozen=True)
class ShardedConditional:
    """One Conditional whose experts were spread: where it is and which experts this rank holds."""

    path: str
    conditional: Conditional
    local: tuple[str, ...]
    experts: int


class ExpertParallel:
    """What :func:`shard_experts` did to a model, and the steps training needs from it.

    Attributes:
        groups: the process groups.
        sharded: the Conditionals whose experts were spread.
        expert_parameter_names: qualified names of this rank's expert parameters (for DDP to
            ignore: they are not replicated over the data-parallel ranks).
    """

    def __init__(self, groups: ExpertGroups, sharded: Sequence[ShardedConditional], expert_parameter_names: set[str]):
        self.groups, self.sharded = groups, tuple(sharded)
        self.expert_parameter_names = frozenset(expert_parameter_names)

    def summary(self) -> str:
        """One line: which Conditionals, experts per rank, the group sizes."""
        g = self.groups
        where = ", ".join(
            f"'{s.path}' ({s.experts} experts, {len(s.local)} per rank)"
            if s.path
            else f"the model ({s.experts} experts, {len(s.local)} per rank)"
            for s in self.sharded
        )
        return (
            f"expert parallel: {where}; expert-parallel group of {g.ep_size} ranks, {g.replica_size} "
            f"data-parallel cop{'y' if g.replica_size == 1 else 'ies'} of each expert, {g.world_size} ranks in all"
        )

    def expert_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """This rank's expert parameters, in ``model.named_parameters()`` order."""
        return [p for name, p in model.named_parameters() if name in self.expert_parameter_names]

    def reduce_replica_grads(self, model: nn.Module) -> None:
        """Average expert gradients over the copies of the expert shard (nothing with one copy).

        Call it after the backward(s) of a step, on every rank. A copy that got no gradient for
        an expert another copy got one for counts as zero; an expert no copy reached keeps ``None``.
        """
        if self.groups.replica_group is None:
            return
        params = self.expert_parameters(model)
        if not params:
            return
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
        dist.all_reduce(present, op=dist.ReduceOp.MAX, group=self.groups.replica_group)
        for p, somewhere in zip(params, present.tolist()):
            if not somewhere:
                continue
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=self.groups.replica_group)
            p.grad = grad.div_(self.groups.replica_size)

    def full_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """The single-process model's ``state_dict`` (every expert), on every rank (a collective)."""
        state = model.state_dict()
        experts = {k: v.detach().cpu() for k, v in state.items() if self._is_expert_key(k)}
        gathered: list[dict[str, Tensor] | None] = [None] * self.groups.ep_size
        dist.all_gather_object(gathered, experts, group=self.groups.ep_group)
        full = {k: v for k, v in state.items() if not self._is_expert_key(k)}
        for part in gathered:
            for k, v in (part or {}).items():
                full[k] = v
        return full

    def local_state_dict(self, full: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
        """The part of a full (single-process) ``state_dict`` this rank holds, checked for completeness."""
        own = model.state_dict()
        missing = [k for k in own if k not in full]
        if missing:
            raise KeyError(
                f"expert parallel: the state to load lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}: "
                "it is not a full state of this model"
            )
        return {k: full[k] for k in own}

    def _is_expert_key(self, key: str) -> bool:
        return any(is_under(key, join_name(s.path, b)) for s in self.sharded for b in s.conditional.branch_names)


def routed_conditionals(model: nn.Module) -> list[tuple[str, Conditional]]:
    """The Conditionals routed per sample by a gate module, outermost only.

    A Conditional inside another's branch runs on the rank that holds that branch, with all of
    its own branches there: it stays local.
    """
    found: list[tuple[str, Conditional]] = []
    for path, module in model.named_modules():
        if not isinstance(module, Conditional) or not isinstance(getattr(module, "router", None), nn.Module):
            continue
        if any(is_under(path, join_name(outer, b)) for outer, c in found for b in c.branch_names):
            continue
        found.append((path, module))
    return found


def shard_experts(model: nn.Module, ep_size: int | None = None, groups: ExpertGroups | None = None) -> ExpertParallel:
    """Spread the experts of every per-sample-routed Conditional in ``model`` over ranks, in place.

    This rank keeps its experts (``E / ep_size`` consecutive branches of each Conditional) and
    drops the others from the module, so their parameters do not exist here. Every rank must
    build the same model (same initialisation) and call this at the same point.

    Args:
        model: the model (a composite, or any module holding Conditionals).
        ep_size: ranks that share one copy of the experts (``None``: all ranks).
        groups: process groups made by :func:`expert_groups` (made here when ``None``).

    Returns:
        An :class:`ExpertParallel`: its ``expert_parameter_names`` must be ignored by DDP, its
        ``reduce_replica_grads`` called after the backward when ``ep_size`` < world size.

    Example:
        >>> import torch.distributed as dist, tempfile, os
        >>> from torch import nn
        >>> from composites import Conditional
        >>> store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
        >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        >>> moe = Conditional({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}, router=nn.Linear(2, 2))
        >>> print(shard_experts(moe).summary())
        expert parallel: the model (2 experts, 2 per rank); expert-parallel group of 1 ranks, 1 data-parallel copy of each expert, 1 ranks in all
        >>> moe(torch.ones(3, 2)).shape
        torch.Size([3, 2])
        >>> dist.destroy_process_group()
    """
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        raise ValueError(
            "expert parallelism: the model is sharded already (FSDP2 / DTensor parameters); expert parallelism does "
            "not compose with FSDP2: spread the experts on a plain model and train the rest data-parallel "
            "(trainer=expert_parallel), or shard the whole model with trainer=fsdp"
        )
    found = routed_conditionals(model)
    if not found:
        raise ValueError(
            "expert parallelism: the model has no Conditional routed per sample by a gate module (router=nn.Module "
            "returning scores), so there are no experts to spread; use trainer=ddp"
        )
    groups = groups or expert_groups(ep_size)
    for path, conditional in found:
        experts = len(conditional.branch_names)
        if experts % groups.ep_size:
            where = f"'{path}'" if path else "the model"
            divisors = [d for d in range(1, experts + 1) if experts % d == 0 and groups.world_size % d == 0]
            raise ValueError(
                f"expert parallelism: the Conditional {where} has {experts} experts, which do not split evenly over "
                f"expert_parallel_size={groups.ep_size} ranks; set expert_parallel_size to one of {divisors}"
            )
    sharded, names = [], set()
    for path, conditional in found:
        dispatch = ExpertDispatch(conditional.branch_names, groups)
        for branch in conditional.branch_names:
            if branch not in dispatch.local:
                delattr(conditional, branch)
        conditional.dispatcher = dispatch
        for branch in dispatch.local:
            prefix = join_name(path, branch)
            for name, p in getattr(conditional, branch).named_parameters():
                names.add(join_name(prefix, name))
                if p.requires_grad and groups.ep_size > 1:
                    # every group member's loss reached it: the sum of ep_size per-rank means
                    p.register_hook(_scaled(1 / groups.ep_size))
        sharded.append(ShardedConditional(path, conditional, dispatch.local, len(conditional.branch_names)))
    return ExpertParallel(groups, sharded, names)


def _scaled(factor: float) -> Callable[[Tensor], Tensor]:
    def scale(grad: Tensor) -> Tensor:
        return grad * factor

    return scale
