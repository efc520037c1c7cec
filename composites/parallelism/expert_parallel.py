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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..modules import Conditional, is_under, join_name
from .expert_dispatch import ExpertDispatch
from .expert_groups import ExpertGroups, expert_groups


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

    Example (what :func:`shard_experts` returns):
        >>> ExpertParallel(ExpertGroups(2, 2, 0, None, 1, None, None), [], {"moe.e0.weight"}).expert_parameter_names
        frozenset({'moe.e0.weight'})
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
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8, device=params[0].device)
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

    Example:
        >>> inner = Conditional({"x": nn.Identity(), "y": nn.Identity()}, router=nn.Linear(2, 2))
        >>> outer = Conditional({"a": inner, "b": nn.Identity()}, router=nn.Linear(2, 2))
        >>> [path for path, _ in routed_conditionals(nn.ModuleDict({"moe": outer}))]
        ['moe']
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
