"""A Conditional with its own route: a learned gate that sees only the first few features."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from composites import Conditional


class FeatureGate(Conditional):
    """Send each sample to its top-k experts, chosen from its first ``gate_features`` features only.

    Only :meth:`route` is overridden: it returns per-sample scores ``(batch, experts)``, and
    the Conditional runs each sample through its chosen experts and weights their outputs by
    the gate's softmax probability, so the gate learns (and the guard checks it does).

    Example:
        >>> import torch
        >>> experts = FeatureGate({"a": nn.Linear(20, 4), "b": nn.Linear(20, 4)}, gate_features=12)
        >>> experts(torch.randn(6, 20)).shape
        torch.Size([6, 4])
    """

    def __init__(self, branches: Mapping[str, nn.Module], gate_features: int, top_k: int = 1):
        super().__init__(branches, router=None, top_k=top_k)
        self.gate_features = gate_features
        self.gate = nn.Linear(gate_features, len(self.branch_names))

    def route(self, x: Tensor) -> Tensor:
        return self.gate(x[:, : self.gate_features])
