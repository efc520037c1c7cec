"""Models for the benchmarks: each composite next to the nn.Module a user would write by hand.

Both sides of a pair hold deep copies of the same sub-modules, so they do the same
arithmetic and differ only in the glue between sub-models.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from composites import Conditional, Parallel, Sequential

# (input width, hidden width, batch): "small" is dispatch-bound, "medium" is FLOP-bound.
SIZES = {"small": (32, 64, 32), "medium": (256, 1024, 128)}
CLASSES = 10


class HandSequential(nn.Module):
    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


class HandParallel(nn.Module):
    def __init__(self, deep: nn.Module, wide: nn.Module):
        super().__init__()
        self.deep, self.wide = deep, wide

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.deep(x), self.wide(x)], dim=-1)


def sequential_pair(size: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """(composite, hand-written, input, class targets) of a two-stage classifier."""
    d, h, batch = SIZES[size]
    encoder = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU())
    head = nn.Linear(h, CLASSES)
    composite = Sequential({"encoder": encoder, "head": head})
    hand = HandSequential(copy.deepcopy(encoder), copy.deepcopy(head))
    return composite, hand, torch.randn(batch, d), torch.randint(0, CLASSES, (batch,))


def parallel_pair(size: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """(composite, hand-written, input, regression target) of a two-branch concat model."""
    d, h, batch = SIZES[size]
    deep = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h // 2))
    wide = nn.Linear(d, h // 2)
    composite = Parallel({"deep": deep, "wide": wide}, combine="concat")
    hand = HandParallel(copy.deepcopy(deep), copy.deepcopy(wide))
    return composite, hand, torch.randn(batch, d), torch.randn(batch, h)


def loss_for(target: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    return F.cross_entropy if target.dtype == torch.long else F.mse_loss


def train_step(model: nn.Module, x: Tensor, y: Tensor, check: Callable[[], Any] | None = None) -> Callable[[], None]:
    """One full step (zero_grad, forward, loss, backward, [check], Adam step) as a closure.

    Adam because that is what users train with; on CPU it runs its per-parameter Python loop,
    a fixed cost both sides of every comparison pay alike.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss_fn = loss_for(y)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        if check is not None:
            check()
        optimizer.step()

    return step


# ------------------------------------------------------------------ per-sample routing (MoE)
def expert(d: int, h: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, d))


class DenseMoE(nn.Module):
    """Every expert computes every sample; a one-hot mask (times the gate weight) keeps one."""

    def __init__(self, experts: list[nn.Module], gate: nn.Module):
        super().__init__()
        self.experts, self.gate = nn.ModuleList(experts), gate

    def forward(self, x: Tensor) -> Tensor:
        probs = self.gate(x).softmax(dim=-1)  # (batch, experts)
        weight, chosen = probs.topk(1, dim=-1)
        mask = torch.zeros_like(probs).scatter(1, chosen, weight)  # gate weight at the chosen expert
        outputs = torch.stack([e(x) for e in self.experts], dim=1)  # (batch, experts, d)
        return (outputs * mask.unsqueeze(-1)).sum(dim=1)


class LoopMoE(nn.Module):
    """A Python loop over samples: each sample runs its own expert (what a first attempt looks like)."""

    def __init__(self, experts: list[nn.Module], gate: nn.Module):
        super().__init__()
        self.experts, self.gate = nn.ModuleList(experts), gate

    def forward(self, x: Tensor) -> Tensor:
        weight, chosen = self.gate(x).softmax(dim=-1).topk(1, dim=-1)
        rows = [self.experts[e](x[i : i + 1]) * weight[i] for i, e in enumerate(chosen.flatten().tolist())]
        return torch.cat(rows)


def moe_models(d: int, h: int, n_experts: int, batch: int) -> tuple[dict[str, nn.Module], Tensor]:
    """Routed (Conditional, host-sized and capacity 1.25), dense and loop models over copies of the same experts and gate."""
    experts = [expert(d, h) for _ in range(n_experts)]
    gate = nn.Linear(d, n_experts)
    routed = Conditional({f"e{i}": e for i, e in enumerate(experts)}, router=gate, top_k=1)
    models = {
        "routed": routed,
        "dense": DenseMoE(copy.deepcopy(experts), copy.deepcopy(gate)),
        "loop": LoopMoE(copy.deepcopy(experts), copy.deepcopy(gate)),
        "capacity": Conditional(
            {f"e{i}": e for i, e in enumerate(copy.deepcopy(experts))},
            router=copy.deepcopy(gate),
            top_k=1,
            capacity_factor=1.25,
        ),
    }
    return models, torch.randn(batch, d)
