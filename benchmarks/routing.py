"""Section routing: per-sample top-1 over 8 experts against dense-and-mask, a per-sample loop and the FLOP floor."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks import Row, Settings, compared, interleave, moe_models


def _backward(model: nn.Module, x: Tensor) -> Callable[[], None]:
    """Forward + backward, no optimizer step: Adam's cost per parameter is the same however
    samples were routed, so leaving it out isolates what routing changes."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    return step


def _inference(model: nn.Module, x: Tensor) -> Callable[[], None]:
    def infer() -> None:
        with torch.no_grad():
            model(x)

    return infer


def _experts_only(models: dict[str, nn.Module], x: Tensor) -> Callable[[], None]:
    """The FLOP floor: each expert on exactly its routed rows (pre-gathered), nothing else."""
    routed = models["routed"]
    with torch.no_grad():
        chosen = routed.router(x).argmax(dim=-1)
    experts = [routed.get_submodule(name) for name in routed.branch_names]
    chunks = [(e, x[chosen == i]) for i, e in enumerate(experts) if bool((chosen == i).any())]

    def step() -> None:
        routed.zero_grad(set_to_none=True)
        sum(e(c).square().sum() for e, c in chunks).backward()

    return step


def run(s: Settings) -> list[Row]:
    """Top-1 routing over 8 experts against dense-and-mask and a per-sample loop."""
    d, h, n_experts, batch = (128, 256, 8, 64) if s.quick else (256, 512, 8, 256)
    torch.manual_seed(0)
    models, x = moe_models(d, h, n_experts, batch)
    rows = []
    for mode, make in (("forward+backward", _backward), ("inference", _inference)):
        cases = {name: make(m, x) for name, m in models.items()}
        if mode == "forward+backward":
            cases["experts only"] = _experts_only(models, x)
        t = interleave(cases, s, warmup=1)
        target = 0.30 if mode == "forward+backward" else None
        note = f"{n_experts} experts {d}-{h}-{d}, batch {batch}; FLOP limit {1 / n_experts:.3f}"
        rows.append(compared("routing", f"{mode}: routed / dense", t, "routed", "dense", target, note))
        rows.append(compared("routing", f"{mode}: routed / per-sample loop", t, "routed", "loop"))
        rows.append(
            compared(
                "routing",
                f"{mode}: capacity 1.25 / dense",
                t,
                "capacity",
                "dense",
                note="fixed slots, no host read: compiles whole (see the compile section)",
            )
        )
        if "experts only" in cases:
            rows.append(
                compared(
                    "routing",
                    f"{mode}: routed / experts-only floor",
                    t,
                    "routed",
                    "experts only",
                    note="dispatch overhead over the FLOP floor",
                )
            )
    return rows
