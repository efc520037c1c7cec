"""Section gpu, CUDA only: Parallel on streams vs serial, routing on the GPU.

GPU work is asynchronous, so every timed call ends with ``torch.cuda.synchronize()`` and the
clock is the wall clock (process CPU time does not see the GPU). Both sides of a ratio pay
the same synchronisation. Without a CUDA device the section reports one row saying so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn

from benchmarks import Row, Settings, compared, interleave, moe_models, wall_clock
from composites import Parallel

# (branches, width, depth, batch): small branches leave most of the GPU idle, large fill it
STREAM_SIZES = {"small": (4, 64, 2, 32), "large": (4, 4096, 2, 4096)}


def _branch(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers)


def _synced_step(model: nn.Module, x: Tensor) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        torch.cuda.synchronize()

    return step


def _sync_count(fn: Callable[[], object]) -> int:
    """Host syncs in one call, counted by CUDA's sync debug mode (each one warns)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def run(s: Settings) -> list[Row]:
    """Streams against serial and GPU routing against dense; one "skipped" row without CUDA."""
    if not torch.cuda.is_available():
        return [
            Row("gpu", "skipped: no CUDA device", float("nan"), note="run on a GPU machine for streams and GPU routing")
        ]
    with wall_clock():
        return _streams(s) + _routing(s)


def _streams(s: Settings) -> list[Row]:
    rows = []
    for size, (n, width, depth, batch) in STREAM_SIZES.items():
        torch.manual_seed(0)
        branches = {f"b{i}": _branch(width, depth) for i in range(n)}
        serial = Parallel(branches, combine="sum").cuda()
        streamed = Parallel(copy.deepcopy(branches), combine="sum", streams=True).cuda()
        x = torch.randn(batch, width, device="cuda")
        t = interleave({"streams": _synced_step(streamed, x), "serial": _synced_step(serial, x)}, s, warmup=3)
        note = f"{torch.cuda.get_device_name()}; {n} branches of {depth}x{width}, batch {batch}, fp32"
        rows.append(compared("gpu", f"Parallel streams / serial, {size}", t, "streams", "serial", note=note))
    return rows


def _routing(s: Settings) -> list[Row]:
    d, h, n_experts, batch = 1024, 4096, 8, 4096
    torch.manual_seed(0)
    models, x = moe_models(d, h, n_experts, batch)
    models = {name: models[name].cuda() for name in ("routed", "dense", "capacity")}
    x = x.cuda()
    cases = {name: _synced_step(m, x) for name, m in models.items()}
    t = interleave(cases, s, warmup=3)
    syncs = {name: _sync_count(lambda m=m: m(x)) for name, m in models.items()}
    note = f"{n_experts} experts {d}-{h}-{d}, batch {batch}; host syncs per forward: " + ", ".join(
        f"{k} {v}" for k, v in syncs.items()
    )
    return [
        compared("gpu", "routing: routed / dense", t, "routed", "dense", note=note),
        compared("gpu", "routing: capacity 1.25 / dense", t, "capacity", "dense"),
        compared("gpu", "routing: capacity 1.25 / routed", t, "capacity", "routed"),
    ]
