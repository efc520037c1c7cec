"""Per-sample top-k dispatch: gather each branch's samples, run it once, scatter back."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def dispatch_top_k(
    branches: Sequence[nn.Module], scores: Tensor, x: Tensor, top_k: int
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
@torch.compiler.disable(recursive=False)
def _dispatch(
    branches: Sequence[nn.Module], scores: Tensor, x: Tensor, top_k: int
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
    fraction = torch.bincount(chosen.reshape(-1), minlength=n).to(probs.dtype) / chosen.numel()
    return n * (fraction * probs.mean(dim=0)).sum()
