"""Replay a forward with hooks on every module to see what ran, how, and what reaches what."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .forward_state import state_kept
from .nested import tensors_in
from .step import RecordedCall, as_recorded


@dataclass(eq=False)
class Call:
    """One module call seen during a replay."""

    path: str
    module: nn.Module
    parent: Call | None
    start: int
    grad: bool
    inputs: list[Any] = field(default_factory=list)  # autograd nodes, or leaf tensors needing grad
    outputs: list[Any] = field(default_factory=list)
    end: int = -1
    # leaf tensors its own code passed to torch ops: id -> whether once with grad on. This is
    # how a parameter whose module never runs (nn.ParameterList, a weight used functionally by
    # its parent) is seen being used (detached? under no_grad?) rather than unused
    used: dict[int, bool] = field(default_factory=dict)
    # the inputs a torch op read while it ran (its own code or a call inside), as graph ends: an
    # input never read was not cut off (detach, no_grad), the forward did not use it (a decoder
    # whose layers LayerDrop all skipped never reads the encoder's output)
    read: list[Any] = field(default_factory=list)
    unread: dict[int, Any] = field(default_factory=dict, repr=False)  # id(input tensor) -> its end, until read

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1


def _ended(value: Any) -> Iterable[tuple[Tensor, Any]]:
    """Each tensor in a (nested) value that hangs in the graph, with where: its node, or itself (a leaf)."""
    for tensor in tensors_in(value, max_depth=3):
        if tensor.grad_fn is not None:
            yield tensor, tensor.grad_fn
        elif tensor.requires_grad:
            yield tensor, tensor


def _ends(value: Any) -> Iterable[Any]:
    """Where each tensor in a (nested) value hangs in the graph."""
    return (end for _, end in _ended(value))


# what reads a tensor's values without returning a tensor (metadata such as .shape is no use)
_READS = frozenset({"tolist", "item", "numpy", "__float__", "__int__", "__index__", "__bool__", "__array__"})


def _holds_tensor(result: Any) -> bool:
    """A tensor, or a tuple of them (``F.multi_head_attention_forward``); not metadata such as a ``torch.Size``."""
    if isinstance(result, Tensor):
        return True
    return (
        isinstance(result, (tuple, list))
        and not isinstance(result, torch.Size)
        and any(isinstance(r, Tensor) for r in result)
    )


class _Uses(TorchFunctionMode):
    """Records, on the innermost running call, each leaf tensor needing grad that a torch op reads,
    and, on every running call, which of its inputs were read (metadata such as ``.shape`` is no read)."""

    def __init__(self, stack: list[Call]):
        super().__init__()
        self.stack = stack

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if self.stack and (_holds_tensor(result) or getattr(func, "__name__", "") in _READS):
            used, grad = self.stack[-1].used, torch.is_grad_enabled()
            for value in (*args, *(kwargs or {}).values()):
                for t in value if isinstance(value, (list, tuple)) else (value,):
                    if not (isinstance(t, Tensor) and t.requires_grad):
                        continue
                    if t.grad_fn is None:
                        used[id(t)] = used.get(id(t), False) or grad
                    for call in self.stack:
                        end = call.unread.pop(id(t), None)
                        if end is not None:
                            call.read.append(end)
        return result


def replay(model: nn.Module, calls: Iterable[RecordedCall | tuple[nn.Module, tuple, dict]]) -> list[Call]:
    """Run recorded calls again with every module traced; the model's state is kept.

    The model's own calls are replayed when there are any; otherwise the calls a training
    loop made to its sub-models directly (``model.encoder(x)`` then ``model.head(h)``).

    Each call starts from the random state (CPU and CUDA) and buffers it was recorded with,
    so LayerDrop, dropout and router noise take the path they took. Buffers (e.g. BatchNorm
    statistics), Conditional bookkeeping and the random generators are restored afterwards, so
    a replay changes nothing the training loop can see.
    """
    trace: list[Call] = []
    stack: list[Call] = []
    names = {id(m): n for n, m in model.named_modules()}
    clock = itertools.count()

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = Call(
            names.get(id(module), "?"), module, stack[-1] if stack else None, next(clock), torch.is_grad_enabled()
        )
        ended = list(_ended((args, kwargs)))
        call.inputs = [end for _, end in ended]
        call.unread = {id(tensor): end for tensor, end in ended}  # alive while it runs: the caller holds them
        trace.append(call)
        stack.append(call)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if stack and stack[-1].module is module:
            call = stack.pop()
            call.outputs, call.end, call.unread = list(_ends(output)), next(clock), {}

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        handles.append(module.register_forward_hook(after, with_kwargs=True, always_call=True))
    try:
        calls = [as_recorded(c) for c in calls]
        outermost = [c for c in calls if c.module is model] or calls
        with state_kept(model), torch.enable_grad(), _Uses(stack):
            for call in outermost:
                if call.state is not None:
                    call.state.start(model)
                stack.clear()
                call.module(*call.args, **call.kwargs)
    except Exception as error:  # a replay that fails still leaves what it traced; the user hears why
        warnings.warn(
            f"GradientGuard could not replay the recorded forward to name the causes ({type(error).__name__}: "
            f"{error}); causes of what comes after that point may be wrong",
            RuntimeWarning,
            stacklevel=2,
        )
    finally:
        for handle in handles:
            handle.remove()
    return trace
