"""Sections 1-3 of scripts/bench.py: composite glue, the guard's check, per-sample routing."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from bench_models import SIZES, moe_models, parallel_pair, sequential_pair, train_step
from bench_timing import Row, Settings, compared, interleave
from torch import Tensor, nn

from composites import GradientGuard

PAIRS = {"Sequential": sequential_pair, "Parallel": parallel_pair}
GLUE_TARGET = {"small": 1.05, "medium": 1.02}
GUARD_TARGET = {"small": 1.10, "medium": 1.02}
STRUCTURAL_TARGET = {"small": 1.02}


def composites_vs_hand(s: Settings) -> list[Row]:
    """Section 1: a composite's train step against the hand-written module's."""
    rows = []
    for size in SIZES:
        for kind, pair in PAIRS.items():
            torch.manual_seed(0)
            composite, hand, x, y = pair(size)
            cases = {
                "composite": train_step(composite, x, y),
                "hand": train_step(hand, x, y),
                "hand copy": train_step(copy.deepcopy(hand), x, y),  # A/A: what "no difference" measures as
            }
            t = interleave(cases, s)
            rows.append(
                compared(
                    "composites", f"{kind} {size}: composite / hand-written", t, "composite", "hand", GLUE_TARGET[size]
                )
            )
            rows.append(
                compared(
                    "composites",
                    f"{kind} {size}: hand-written copy / hand-written (A/A)",
                    t,
                    "hand copy",
                    "hand",
                    note="the noise floor: any ratio this far from 1 is not a difference",
                )
            )
    return rows


def guard_overhead(s: Settings) -> list[Row]:
    """Section 2: the same train step with ``guard.check()`` after backward, against none.

    Separate copies of one model, so the guard's hooks (forward pre-hooks, a tensor hook per
    parameter) sit only on the guarded copies. "hooks only"
    builds a guard and never calls check(): it splits the hooks' cost from the check's.
    """
    rows = []
    for size in SIZES:
        for kind, pair in PAIRS.items():
            torch.manual_seed(0)
            model, _, x, y = pair(size)
            full, structural, hooked = (copy.deepcopy(model) for _ in range(3))
            hooks_guard = GradientGuard(hooked)  # never checked: its bookkeeping is bounded
            cases = {
                "none": train_step(model, x, y),
                "full": train_step(full, x, y, GradientGuard(full).check),
                "structural": train_step(structural, x, y, GradientGuard(structural, check_finite=False).check),
                "hooks only": train_step(hooked, x, y),
            }
            t = interleave(cases, s.scaled(1.5))
            del hooks_guard  # alive until here: the model's hooks hold their guard only weakly
            name = f"{kind} {size}: "
            rows.append(compared("guard", name + "check (finite on) / none", t, "full", "none", GUARD_TARGET[size]))
            rows.append(
                compared(
                    "guard", name + "check (structural) / none", t, "structural", "none", STRUCTURAL_TARGET.get(size)
                )
            )
            rows.append(compared("guard", name + "hooks only, no check() / none", t, "hooks only", "none"))
    return rows


def _backward(model: nn.Module, x: Tensor) -> Callable[[], None]:
    """Forward + backward, no optimizer step: Adam's cost per parameter is the same however
    samples were routed, so leaving it out isolates what routing changes."""

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    return step


def _inference(model: nn.Module, x: Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(x)

    return run


def _experts_only(models: dict[str, nn.Module], x: Tensor) -> Callable[[], None]:
    """The FLOP floor: each expert on exactly its routed rows (pre-gathered), nothing else."""
    routed = models["routed"]
    with torch.no_grad():
        chosen = routed.router(x).argmax(dim=-1)
    experts = [routed._modules[name] for name in routed.branch_names]
    chunks = [(e, x[chosen == i]) for i, e in enumerate(experts) if bool((chosen == i).any())]

    def step() -> None:
        routed.zero_grad(set_to_none=True)
        sum(e(c).square().sum() for e, c in chunks).backward()

    return step


def routing(s: Settings) -> list[Row]:
    """Section 3: top-1 routing over 8 experts against dense-and-mask and a per-sample loop."""
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
