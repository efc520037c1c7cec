"""Run independent branches concurrently on CUDA streams (Parallel's opt-in ``streams=True``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_leaves


def cuda_device_of(*values: Any) -> torch.device | None:
    """The device of the first CUDA tensor found in ``values`` (nested), or ``None``.

    Example:
        >>> cuda_device_of(torch.ones(2), {"a": [torch.zeros(1)]}) is None
        True
    """
    for leaf in tree_leaves(values):
        if isinstance(leaf, Tensor) and leaf.is_cuda:
            return leaf.device
    return None


def run_on_streams(jobs: Mapping[str, Callable[[], Any]], inputs: Any, device: torch.device) -> dict[str, Any]:
    """Launch each job on its own CUDA stream; return once the current stream waits for all.

    The first job runs on the current stream, the others on streams from PyTorch's pool, each
    starting after the work already queued (its inputs). The kernels then overlap on the GPU
    when each is too small to fill it; the host still launches them one by one. Autograd runs
    each backward kernel on its forward kernel's stream and synchronises them itself.

    Memory: the caching allocator ties a block to the stream it was allocated on, so an input
    read on a side stream, or an output made there and read on the current stream, is
    recorded on the other stream too; otherwise its memory could be handed out again while
    the other stream still uses it.

    Args:
        jobs: name -> a call that runs one branch.
        inputs: every tensor the jobs read (nested structures allowed).
        device: the CUDA device they run on.

    Example:
        >>> if torch.cuda.is_available():
        ...     x = torch.ones(2, device="cuda")
        ...     out = run_on_streams({"a": lambda: x + 1, "b": lambda: x * 3}, x, x.device)
        ...     assert out["b"].tolist() == [3.0, 3.0]
    """
    current = torch.cuda.current_stream(device)
    in_tensors = [t for t in tree_leaves(inputs) if isinstance(t, Tensor) and t.is_cuda]
    names = list(jobs)
    # Every side stream waits for the work queued so far (the inputs) BEFORE the first job is
    # queued on the current stream; waiting after it would make every side branch wait for
    # the first one too, and nothing would overlap.
    side = {name: torch.cuda.Stream(device) for name in names[1:]}
    for stream in side.values():
        stream.wait_stream(current)
        for t in in_tensors:
            t.record_stream(stream)
    outputs: dict[str, Any] = {names[0]: jobs[names[0]]()}
    for name, stream in side.items():
        with torch.cuda.stream(stream):
            outputs[name] = jobs[name]()
    for stream in side.values():
        current.wait_stream(stream)
    for t in tree_leaves([outputs[name] for name in side]):
        if isinstance(t, Tensor) and t.is_cuda:
            t.record_stream(current)
    return outputs
