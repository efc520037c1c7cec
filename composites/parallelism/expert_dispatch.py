"""A Conditional's dispatch over an expert-parallel group: rows to the experts' ranks and back by all-to-all.

See :mod:`composites.parallelism.expert_parallel` for why the numbers are the single-process ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from ..modules.compiler_disable import compiler_disable
from ..modules.routing import capacity_slots
from .expert_groups import ExpertGroups


class ExpertDispatch:
    """A Conditional's dispatch over an expert-parallel group (set as ``Conditional.dispatcher``).

    Args:
        names: all branch names of the Conditional, in order (the global expert ids).
        groups: the process groups; this rank holds experts ``[ep_rank * E / ep_size, ...)``.

    Example:
        >>> pair = ExpertGroups(2, 2, 1, None, 1, None, None)  # rank 1 of an expert-parallel group of 2
        >>> ExpertDispatch(["a", "b", "c", "d"], pair).local
        ('c', 'd')
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


# as the single-process dispatch: its chunk sizes are data (a host read), so under torch.compile
# it runs eagerly (one graph break, no recompile per set of counts)
@compiler_disable(recursive=False)
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
    # slots this rank did not fill point at its appended zero row: it sends zeros there
    _, slot_sample, slot_weight = capacity_slots(flat, weight, position, n, capacity, top_k)
    padded = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])  # (batch + 1, ...)
    blocks = _a2a(padded[slot_sample], None, None, group)  # (ranks * per_rank * capacity, ...)
    # each slot was filled by at most one rank, the others sent zeros: the sum is the single-process slots
    slots = blocks.reshape(size, per_rank * capacity, *blocks.shape[1:]).sum(0)  # (per_rank * capacity, ...)
    y = torch.cat([expert(chunk) for expert, chunk in zip(experts, slots.split(capacity))])
    # every rank gets every expert's slots back: (ranks * per_rank * capacity, ...) = (experts * capacity, ...)
    y = _a2a(y.expand(size, *y.shape).reshape(size * y.shape[0], *y.shape[1:]), None, None, group)
    w = slot_weight.to(y.dtype).reshape(-1, *([1] * (y.dim() - 1)))
    out = y.new_zeros((batch + 1, *y.shape[1:])).index_add(0, slot_sample, y * w)[:batch]
    dropped = (every.sum(0) - capacity).clamp_min(0).sum()  # pairs past capacity over the group: no collective
    return out, probs, chosen, local, dropped, 2 * (size - 1) * per_rank * capacity
