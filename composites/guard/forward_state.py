"""What a forward starts from: the random generators and the buffers, captured so a replay starts there too."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..modules import Conditional


@dataclass(frozen=True)
class ForwardState:
    """The random state (CPU and the model's CUDA devices) and, when captured, buffer values at a forward's start.

    Attributes:
        cpu: ``torch.get_rng_state()``.
        cuda: CUDA device index -> ``torch.cuda.get_rng_state(index)``.
        buffers: buffer name -> its value then; only buffers a forward has changed (BatchNorm
            statistics, a step counter): the others still hold the same values.
    """

    cpu: Tensor
    cuda: dict[int, Tensor] = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)

    def start(self, model: nn.Module) -> None:
        """Set the generators (and the captured buffers) to this state; used between replayed calls."""
        torch.set_rng_state(self.cpu)
        for index, state in self.cuda.items():
            torch.cuda.set_rng_state(state, index)
        _copy_into(model, self.buffers)


def _cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA device indices the model's parameters live on: the generators a forward draws from."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _copy_into(model: nn.Module, values: dict[str, Tensor]) -> None:
    if not values:
        return
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            value = values.get(name)
            if value is not None and value.shape == buffer.shape:
                buffer.copy_(value)


@contextmanager
def state_kept(model: nn.Module) -> Iterator[None]:
    """Run the block (a replay), then put back all a forward changes besides outputs: buffers,
    Conditional routing bookkeeping and the random generators (CPU and the model's CUDA devices).

    Example:
        >>> bn = nn.BatchNorm1d(2)
        >>> with state_kept(bn):
        ...     _ = bn(torch.randn(4, 2))
        >>> int(bn.num_batches_tracked)
        0
    """
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    routing = [(c, c.routing_state()) for c in model.modules() if isinstance(c, Conditional)]
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model)):
            yield
    finally:
        _copy_into(model, buffers)
        for conditional, state in routing:
            conditional.load_routing_state(state)


class StateCapture:
    """Captures a :class:`ForwardState` at each recorded forward, cheaply enough to run every step.

    The random state is a few kilobytes copied on the host. The buffers are copied into storage
    kept from step to step, in one fused copy per device and dtype: a forward changes some of
    them in kernels that leave no trace (BatchNorm statistics), so all are copied, once a step.

    Example:
        >>> from torch import nn
        >>> bn = nn.Sequential(nn.BatchNorm1d(2), nn.Linear(2, 2))
        >>> capture = StateCapture(bn)
        >>> before = capture(with_buffers=True)
        >>> sorted(before.buffers), int(before.buffers["0.num_batches_tracked"])
        (['0.num_batches_tracked', '0.running_mean', '0.running_var'], 0)
        >>> _ = bn(torch.randn(4, 2))
        >>> int(before.buffers["0.num_batches_tracked"]), int(capture(with_buffers=True).buffers["0.num_batches_tracked"])
        (0, 1)
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.refresh()

    def refresh(self) -> None:
        """Look the model's buffers and the CUDA devices of its parameters up again (after ``.to()``, a reshard)."""
        # (the module's buffer dict, key, qualified name): a dict lookup per buffer and step, where
        # nn.Module.__getattr__ would cost a few microseconds each
        self._slots = [
            (module._buffers, key, f"{prefix}.{key}" if prefix else key)
            for prefix, module in self.model.named_modules()
            for key, _ in module.named_buffers(recurse=False)
        ]
        self._sources: list[Tensor | None] = []  # the buffers the copies were made for
        self._targets: list[Tensor] = []
        self._copies: dict[str, Tensor] = {}
        self._devices = _cuda_devices(self.model)

    def _buffers_now(self) -> list[Tensor | None]:
        return [buffers.get(key) for buffers, key, _ in self._slots]

    def _allocate(self, now: list[Tensor | None]) -> None:
        """Storage for the copies, made again only when a buffer was replaced (``.to()``, a lazy module, reassignment)."""
        self._sources = now
        self._targets = []
        self._copies = {}
        for (_, _, name), buffer in zip(self._slots, now):
            if buffer is not None:
                copy = torch.empty_like(buffer, memory_format=torch.contiguous_format)
                self._targets.append(copy)
                self._copies[name] = copy

    def __call__(self, with_buffers: bool) -> ForwardState:
        """The state now; ``with_buffers`` also copies the buffers (once per step is enough).

        The copies are reused by the next capture with buffers: a state is good until then.
        """
        cuda = {i: torch.cuda.get_rng_state(i) for i in self._devices}
        if not with_buffers or not self._slots:
            return ForwardState(torch.get_rng_state(), cuda)
        now = self._buffers_now()
        if len(now) != len(self._sources) or any(a is not b for a, b in zip(now, self._sources)):
            self._allocate(now)
        if self._targets:
            with torch.no_grad():
                torch._foreach_copy_(self._targets, [b for b in now if b is not None])
        return ForwardState(torch.get_rng_state(), cuda, self._copies)
