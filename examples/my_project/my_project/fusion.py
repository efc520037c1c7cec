"""A Parallel whose combine is a learned gate: per sample, a softmax weight for each branch."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from composites import Parallel


class GatedFusion(Parallel):
    """Fuse same-width branch outputs by a learned, per-sample weighting (a gate over the branches).

    Only :meth:`combine` is overridden: running the branches (each on its own entry of a dict
    input keyed by branch name) stays the Parallel's. The gate sees every branch's output and
    gives softmax weights, so it learns which sensor to trust for each sample.

    Example:
        >>> fusion = GatedFusion({"audio": nn.Linear(12, 16), "vibration": nn.Linear(8, 16)}, width=16)
        >>> fusion({"audio": torch.zeros(5, 12), "vibration": torch.zeros(5, 8)}).shape
        torch.Size([5, 16])
    """

    def __init__(self, branches: Mapping[str, nn.Module], width: int):
        super().__init__(branches)
        self.gate = nn.Linear(width * len(self.branch_names), len(self.branch_names))

    def combine(self, outputs: dict[str, Tensor]) -> Tensor:
        values = [outputs[name] for name in self.branch_names]
        weights = torch.softmax(self.gate(torch.cat(values, dim=-1)), dim=-1)  # (batch, branches)
        return (torch.stack(values, dim=1) * weights.unsqueeze(-1)).sum(dim=1)  # (batch, width)
