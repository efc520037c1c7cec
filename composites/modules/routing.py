"""Per-sample top-k dispatch: gather each branch's samples, run it once, scatter back.

Two ways: sized by the routing itself (one host read, nothing dropped), or into fixed-capacity
slots (no host read, static shapes, overflow dropped).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor

from .compiler_disable import compiler_disable


def dispatch_top_k(
    branches: Sequence[Callable[[Tensor], Tensor]], scores: Tensor, x: Tensor, top_k: int
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Run each sample through its ``top_k`` branches, weighted by softmax gate probability.

    One sort groups the (sample, branch) pairs by branch, so each branch runs once on a
    contiguous chunk; one host read of the per-branch counts sizes the chunks. No loop over
    samples, and no branch computes samples that were not routed to it.

    Returns:
        ``(output, probs, chosen, ran)``: the combined output ``(batch, ...)``, the gate
        probabilities ``(batch, branches)``, the chosen branch indices ``(batch, top_k)`` and
        the indices of the branches that ran.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> scores = torch.tensor([[0.0, 9.0], [9.0, 0.0], [0.0, 9.0]])
        >>> out, probs, chosen, ran = dispatch_top_k([nn.Identity(), nn.Identity()], scores, torch.ones(3, 1), 1)
        >>> chosen.flatten().tolist(), ran
        ([1, 0, 1], [0, 1])
    """
    return _dispatch(branches, scores, x, top_k)


# Under torch.compile the per-branch chunk sizes are data: traced, they break the graph at
# bincount/.tolist() and then recompile the rest for nearly every batch (a new graph per
# distinct set of counts, ~1 s each, until Dynamo's recompile limit sends it to eager).
# Left out of the trace, the router before it still compiles into one graph, the dispatch
# runs eagerly (one graph break, no recompiles), and recursive=False lets a branch the
# user compiled itself (torch.compile(expert, dynamic=True)) run compiled inside it.
@compiler_disable(recursive=False)  # torch.compiler.disable's, without importing Dynamo with composites
def _dispatch(
    branches: Sequence[Callable[[Tensor], Tensor]], scores: Tensor, x: Tensor, top_k: int
) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    batch = scores.shape[0]
    probs = scores.softmax(dim=-1)  # (batch, branches)
    weight, chosen = probs.topk(top_k, dim=-1)  # (batch, top_k) each
    flat = chosen.reshape(-1)  # (batch * top_k,): the branch of each (sample, slot) pair
    order = flat.argsort(stable=True)
    sample = order // top_k  # which sample each sorted pair belongs to
    counts = torch.bincount(flat, minlength=len(branches)).tolist()  # the one host sync
    chunks = x[sample].split(counts)  # per-branch inputs, contiguous
    outputs = [branches[i](chunk) for i, chunk in enumerate(chunks) if counts[i] > 0]
    ran = [i for i, n in enumerate(counts) if n > 0]
    # an empty batch runs the first branch on its empty chunk, only to learn the output's shape
    y = torch.cat(outputs) if outputs else branches[0](chunks[0])  # (batch * top_k, ...), sorted
    w = weight.reshape(-1)[order].to(y.dtype).reshape(-1, *([1] * (y.dim() - 1)))  # AMP: keep the branch dtype
    out = y.new_zeros((batch, *y.shape[1:])).index_add(0, sample, y * w)
    return out, probs, chosen, ran


def dispatch_with_capacity(
    branches: Sequence[Callable[[Tensor], Tensor]], scores: Tensor, x: Tensor, top_k: int, capacity_factor: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k dispatch into fixed-size per-branch slots: no host read, static shapes.

    Each branch gets ``capacity = ceil(capacity_factor * batch * top_k / branches)`` rows.
    A (sample, branch) pair past its branch's capacity is dropped (earlier samples win) and
    adds nothing to that sample's output, as in Switch Transformer. Every branch runs on its
    slots, padded with zero rows, so the shapes depend on the batch size only: nothing is read
    back to the host and the whole dispatch traces into one graph. ``capacity_factor =
    branches / top_k`` never drops. A branch sees its padding rows as input: one that keeps
    batch statistics (``BatchNorm``) counts them too.

    Returns:
        ``(output, probs, chosen, dropped)``: as :func:`dispatch_top_k`, with the number of
        dropped pairs as a tensor on the device instead of the branches that ran.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> scores = torch.tensor([[0.0, 9.0], [0.0, 9.0], [9.0, 0.0]])
        >>> out, probs, chosen, dropped = dispatch_with_capacity([nn.Identity(), nn.Identity()], scores, torch.ones(3, 1), 1, 2 / 3)
        >>> (out > 0).flatten().tolist(), int(dropped)
        ([True, False, True], 1)
    """
    batch, n = scores.shape
    capacity = max(1, math.ceil(capacity_factor * batch * top_k / n))
    probs = scores.softmax(dim=-1)  # (batch, branches)
    weight, chosen = probs.topk(top_k, dim=-1)  # (batch, top_k) each
    flat = chosen.reshape(-1)  # (batch * top_k,)
    hits = flat[:, None] == torch.arange(n, device=flat.device)  # (batch * top_k, branches)
    position = (hits.cumsum(0) - 1).gather(1, flat[:, None]).squeeze(1)  # rank within its branch
    kept, slot_sample, slot_weight = capacity_slots(flat, weight, position, n, capacity, top_k)
    padded = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])  # (batch + 1, ...)
    chunks = padded[slot_sample].split(capacity)  # branches x (capacity, ...)
    y = torch.cat([branch(chunk) for branch, chunk in zip(branches, chunks)])  # (branches * capacity, ...)
    w = slot_weight.to(y.dtype).reshape(-1, *([1] * (y.dim() - 1)))
    out = y.new_zeros((batch + 1, *y.shape[1:])).index_add(0, slot_sample, y * w)[:batch]
    return out, probs, chosen, (~kept).sum()


def capacity_slots(
    flat: Tensor, weight: Tensor, position: Tensor, n: int, capacity: int, top_k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Fixed-capacity slots for the (sample, branch) pairs: which pairs fit, and each slot's sample and gate weight.

    Branch ``e`` owns slots ``e * capacity ... (e + 1) * capacity - 1``; the pair at ``position``
    in its branch fills slot ``branch * capacity + position`` when ``position < capacity``. A slot
    nobody filled points at sample ``batch`` (a zero row the caller appends) with weight 0.

    Args:
        flat: each pair's branch, ``(batch * top_k,)``, pairs of one sample together.
        weight: each pair's gate weight, ``(batch, top_k)``.
        position: each pair's place in its branch, ``(batch * top_k,)``.
        n: the number of branches.
        capacity: slots per branch.
        top_k: pairs per sample.

    Returns:
        ``(kept, slot_sample, slot_weight)``: which pairs fit ``(batch * top_k,)``, and per slot
        its sample ``(n * capacity,)`` and gate weight ``(n * capacity,)``.

    Example:
        >>> import torch
        >>> flat, position = torch.tensor([1, 1, 0]), torch.tensor([0, 1, 0])
        >>> kept, sample, w = capacity_slots(flat, torch.ones(3, 1), position, n=2, capacity=1, top_k=1)
        >>> kept.tolist(), sample.tolist()
        ([True, False, True], [2, 0])
    """
    batch = flat.numel() // top_k
    kept = position < capacity
    overflow = n * capacity  # one spare slot collects every dropped pair, then is cut off
    slot = torch.where(kept, flat * capacity + position, overflow)
    pair_sample = torch.arange(batch * top_k, device=flat.device) // top_k
    # slots nobody filled point at row `batch`: an appended zero row in, a discarded row out
    slot_sample = torch.full((overflow + 1,), batch, device=flat.device).scatter(0, slot, pair_sample)[:overflow]
    slot_weight = weight.new_zeros(overflow + 1).scatter(0, slot, weight.reshape(-1))[:overflow]
    return kept, slot_sample, slot_weight


def load_balancing_loss(probs: Tensor, chosen: Tensor) -> Tensor:
    """Switch-Transformer load-balancing loss: ``branches * sum_e f_e * P_e``.

    ``f_e`` is the fraction of (sample, slot) pairs routed to branch ``e``, ``P_e`` the mean
    gate probability of ``e``. It is 1.0 when routing is uniform and grows as it collapses.

    Example:
        >>> import torch
        >>> probs = torch.full((4, 2), 0.5)
        >>> load_balancing_loss(probs, torch.tensor([[0], [1], [0], [1]])).item()
        1.0
    """
    n = probs.shape[1]
    if chosen.numel() == 0:  # an empty batch routes nothing: no imbalance, and no NaN from 0 / 0
        return probs.sum() * 0
    flat = chosen.reshape(-1)
    # counted by scatter, not bincount: bincount sizes its output from the data, a host read on GPU
    counts = probs.new_zeros(n).scatter_add(0, flat, torch.ones_like(flat, dtype=probs.dtype))
    fraction = counts / chosen.numel()
    return n * (fraction * probs.mean(dim=0)).sum()


class Dispatcher(Protocol):
    """Runs score-routed samples through branches that may live on other ranks (expert parallelism).

    Called with this rank's branches (name -> callable), the scores ``(batch, branches)``, the
    input, ``top_k`` and ``capacity_factor``; returns ``(output, probs, chosen, ran, dropped)``:
    ``ran`` names the local branches that ran on some rank's samples, ``dropped`` is as in
    :func:`~composites.modules.routing.dispatch_with_capacity` (``None`` without capacity).
    """

    def __call__(
        self,
        branches: Mapping[str, Callable[[Tensor], Tensor]],
        scores: Tensor,
        x: Tensor,
        top_k: int,
        capacity_factor: float | None,
    ) -> tuple[Tensor, Tensor, Tensor, Sequence[str], Tensor | None]: ...

    def load_balancing_loss(self, probs: Tensor, chosen: Tensor) -> Tensor: ...
