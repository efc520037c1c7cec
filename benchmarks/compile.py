"""Section compile: torch.compile of each composite.

For each composite: graph breaks and graphs from ``torch._dynamo.explain``, recompiles over
fresh batches (counted with the "eager" backend: same Dynamo, no codegen), and the speed of
``torch.compile``-d forward+backward against eager on the same weights.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks import Row, Settings, compared, interleave, parallel_pair, sequential_pair
from composites import Conditional

D = 32


def _branches() -> dict[str, nn.Module]:
    return {"small": nn.Linear(D, D), "big": nn.Sequential(nn.Linear(D, 4 * D), nn.ReLU(), nn.Linear(4 * D, D))}


def by_shape(x: Tensor) -> str:
    """A router function on static facts (shape): Dynamo folds it into a guard."""
    return "big" if x.shape[0] >= 16 else "small"


def by_data(x: Tensor) -> str:
    """A router function on the data itself: a Python branch on a tensor, so Dynamo must break."""
    return "big" if x.mean() > 0 else "small"


# name -> what to expect; the host-sized per-sample dispatch is left out of the trace on
# purpose (composites/modules/routing.py): its chunk sizes are data, and traced they recompiled every
# batch. The capacity dispatch has static shapes and traces whole.
EXPECT = {
    "Sequential": "",
    "Parallel": "",
    "Conditional route= by caller": "",
    "Conditional router fn (shape)": "",
    "Conditional router fn (data)": "inherent: a Python if on tensor data",
    "Conditional per-sample top-1": "router compiled; dispatch eager by design (torch.compiler.disable)",
    "Conditional per-sample top-1, capacity 1.25": "",
}


def composites_to_compile() -> dict[str, tuple[nn.Module, dict[str, Any], Callable[[], Tensor]]]:
    """name -> (model, call kwargs, fresh-input maker), each small enough to compile in seconds."""
    torch.manual_seed(0)
    experts = {f"e{i}": nn.Sequential(nn.Linear(D, 2 * D), nn.ReLU(), nn.Linear(2 * D, D)) for i in range(8)}

    def data(width: int) -> Callable[[], Tensor]:
        return lambda: torch.randn(32, width)

    return {
        "Sequential": (sequential_pair("small")[0], {}, data(32)),
        "Parallel": (parallel_pair("small")[0], {}, data(32)),
        "Conditional route= by caller": (Conditional(_branches(), router=None), {"route": "big"}, data(D)),
        "Conditional router fn (shape)": (Conditional(_branches(), router=by_shape), {}, data(D)),
        "Conditional router fn (data)": (Conditional(_branches(), router=by_data), {}, data(D)),
        "Conditional per-sample top-1": (Conditional(experts, router=nn.Linear(D, 8)), {}, data(D)),
        "Conditional per-sample top-1, capacity 1.25": (
            Conditional(copy.deepcopy(experts), router=nn.Linear(D, 8), capacity_factor=1.25),
            {},
            data(D),
        ),
    }


def _explain(model: nn.Module, kwargs: dict[str, Any], x: Tensor) -> tuple[int, int, str]:
    torch._dynamo.reset()
    e = torch._dynamo.explain(model)(x, **kwargs)
    reasons = sorted({r.reason.splitlines()[0].strip() for r in e.break_reasons})
    return e.graph_count, e.graph_break_count, "; ".join(reasons)


def _recompiles(model: nn.Module, kwargs: dict[str, Any], make: Callable[[], Tensor], batches: int) -> int:
    """Recompilations over ``batches`` fresh inputs of one shape (training mode, with backward)."""
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = torch.compile(copy.deepcopy(model), backend="eager")
    for _ in range(batches):
        compiled(make(), **kwargs).square().mean().backward()
    return int(counters["stats"]["unique_graphs"])


def _fwd_bwd(model: nn.Module, x: Tensor, kwargs: dict[str, Any]) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x, **kwargs).square().mean().backward()

    return step


def run(s: Settings) -> list[Row]:
    """Graph breaks, recompiles over fresh batches and (not with --quick) compiled/eager speed."""
    warnings.filterwarnings("ignore", ".*TensorFloat32.*")
    rows = []
    for name, (model, kwargs, make) in composites_to_compile().items():
        graphs, breaks, reasons = _explain(model, kwargs, make())
        expect = EXPECT[name]
        rows.append(
            Row(
                "compile",
                f"{name}: graph breaks",
                float(breaks),
                target=None if expect else 0,
                note="; ".join(filter(None, [f"{graphs} graph(s)", reasons, expect])),
            )
        )
        batches = 3 if s.quick else 8
        unique = _recompiles(model, kwargs, make, batches)
        rows.append(
            Row(
                "compile",
                f"{name}: graphs compiled over {batches} fresh batches",
                float(unique),
                note="more graphs than the explain count = recompiles on data",
            )
        )
    if s.quick:  # inductor's C++ codegen takes seconds per model: not for a smoke run
        return rows
    for name, pair in {"Sequential": sequential_pair, "Parallel": parallel_pair}.items():
        for size in ("small", "medium"):
            torch.manual_seed(0)
            model, hand, x, _ = pair(size)
            torch._dynamo.reset()
            cases = {
                "compiled": _fwd_bwd(torch.compile(copy.deepcopy(model)), x, {}),
                "eager": _fwd_bwd(model, x, {}),
                # the same for the hand-written module: is a slowdown ours or torch.compile's?
                "compiled hand": _fwd_bwd(torch.compile(hand), x, {}),
            }
            t = interleave(cases, s, warmup=2)
            rows.append(
                compared(
                    "compile",
                    f"{name} {size}: compiled / eager (forward+backward)",
                    t,
                    "compiled",
                    "eager",
                    note="inductor, CPU",
                )
            )
            rows.append(
                compared(
                    "compile",
                    f"{name} {size}: compiled composite / compiled hand-written",
                    t,
                    "compiled",
                    "compiled hand",
                )
            )
    return rows
