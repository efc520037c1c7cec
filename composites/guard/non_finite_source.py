"""Where a NaN/Inf came from: the failing path of the guard's finite check, run only when it fails.

The check that runs every step is one fused reduction over the gradients (``finite.py``). Only
when it finds a NaN or Inf does this replay the recorded forward once, with a forward hook on
every module, to name the first module whose output went non-finite; when the forward was
finite, the gradient that went non-finite first in backward is named instead.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .finite import stored
from .forward_state import state_kept
from .nested import tensors_in
from .problems import Problem
from .step import as_recorded
from .structure import submodel_names


def non_finite(value: Any) -> bool:
    """Whether any floating-point tensor in ``value`` (nested lists, tuples, dicts) holds NaN or Inf; one host read.

    Example:
        >>> non_finite({"a": torch.ones(2), "b": [torch.tensor([1.0, float("inf")])]}), non_finite((torch.ones(1), 3))
        (True, False)
    """
    tensors = (t for t in tensors_in(value) if t.is_floating_point() or t.is_complex())
    flags = [torch.isfinite(t.detach()).all() for t in tensors]
    return bool(flags) and not bool(torch.stack([f.to("cpu", non_blocking=False) for f in flags]).all())


def replay_for_source(model: nn.Module, calls: Sequence[Any]) -> tuple[tuple[str, int] | None, dict[str, int]]:
    """Replay ``calls``: ``(module path, call index)`` of the first non-finite output, and when each module last finished.

    "First" is in forward order: modules finish their forward innermost first, so this is the
    module that made the NaN/Inf, not an outer one that passed it on. ``"<input>"`` is the path
    when a call's input was already non-finite (the data). The finishing order (module path ->
    position) is complete when no source was found. ``"<replay failed>"`` is the path when
    call ``index`` raised in the replay (with a warning): the forward's finiteness is unknown.
    Random state, buffers and routing bookkeeping are put back afterwards; each call starts from
    its recorded state when it has one.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.LogSigmoid(), nn.Linear(2, 1))
        >>> replay_for_source(net, [(net, (torch.ones(1, 2),), {})])
        (None, {'0': 0, '1': 1, '2': 2, '': 3})
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(float("inf"))
        >>> replay_for_source(net, [(net, (torch.ones(1, 2),), {})])[0]
        ('0', 0)
    """
    paths = {id(m): path for path, m in model.named_modules()}
    found: list[str] = []
    order: dict[str, int] = {}
    clock = itertools.count()

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        path = paths.get(id(module), "?")
        order[path] = next(clock)
        if not found and non_finite(output):
            found.append(path)

    handles = [m.register_forward_hook(after) for m in model.modules()]
    index = 0
    try:
        with state_kept(model), torch.enable_grad():
            for index, call in enumerate(calls):
                call = as_recorded(call)
                if non_finite((call.args, call.kwargs)):
                    return ("<input>", index), order
                if call.state is not None:
                    call.state.start(model)
                call.module(*call.args, **call.kwargs)
                if found:
                    return (found[0], index), order
    except Exception as error:  # a replay that fails names no source; the gradients still do
        warnings.warn(
            f"GradientGuard could not replay the recorded forward to find the NaN/Inf source "
            f"({type(error).__name__}: {error})",
            RuntimeWarning,
            stacklevel=2,
        )
        return ("<replay failed>", index), order
    finally:
        for handle in handles:
            handle.remove()
    return None, order


def _loss_note(loss: Tensor | None) -> str:
    if loss is None:
        return ""
    return "; the loss is finite" if not non_finite(loss) else "; the loss itself is non-finite"


def non_finite_problems(record: Any) -> list[Problem]:
    """A ``non_finite`` problem for each parameter whose gradient holds NaN/Inf, each ``where`` naming the source.

    The source is the first module (forward order) whose output went non-finite in a replay
    of the recorded calls, with its sub-model; else, when the forward was finite, the
    parameter whose gradient went non-finite first in backward order (the last one used in
    forward). The step (the guard's count of checks) and whether the loss is finite are said too.

    Args:
        record: the guard's :class:`~composites.guard.step.StepRecord` of this step (``model``,
            ``names``, ``params``, ``submodels``, ``calls``, ``check``, ``loss``).

    Example:
        >>> from composites.guard.step import StepRecord
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> net(torch.ones(1, 2)).sum().mul(float("nan")).backward()
        >>> names, params = zip(*net.named_parameters())
        >>> record = StepRecord(net, list(names), list(params), {n: n[0] for n in names}, check=3)
        >>> non_finite_problems(record)[0].where
        "step 3: no recorded forward to replay; first non-finite gradient in backward order: '1.weight'"
    """
    model, names, params, submodels, calls = record.model, record.names, record.params, record.submodels, record.calls
    step, loss = getattr(record, "check", 0), getattr(record, "loss", None)
    held = [(name, p.grad) for name, p in zip(names, params) if p.grad is not None]
    finite = torch.stack([torch.isfinite(stored(g)).all() for _, g in held]).tolist() if held else []
    bad = [name for (name, _), ok in zip(held, finite) if not ok]
    if not bad:  # finite norms that overflowed, per tensor all finite (or the bad gradients are on another rank)
        if getattr(record, "collective_forward", False) and calls:
            replay_for_source(model, calls)  # its all-to-alls wait for this rank: replay along, say nothing
        return []
    source, order = replay_for_source(model, calls) if calls else (None, {})
    if source is not None and source[0] != "<replay failed>":
        path, index = source
        if path == "<input>":
            where = f"step {step}: the input of recorded call {index + 1} is already non-finite (the data)"
        else:
            label = (
                f"'{path}' ({type(model.get_submodule(path)).__name__})"
                if path
                else f"the model ({type(model).__name__})"
            )
            sub = submodel_names(model, [f"{path}.-"])[f"{path}.-"] if path else ""
            where = f"step {step}: first non-finite output in forward: {label}" + (
                f", in sub-model '{sub}'" if sub and sub != path else ""
            )
    else:
        # backward runs the forward in reverse: the bad gradient used last in forward arrived first
        # (without a replay, a module registered later is taken to run later)
        rank = {}
        for i, name in enumerate(names):
            rank.setdefault(name.rpartition(".")[0], i)
        first = max(
            bad, key=lambda n: (order.get(n.rpartition(".")[0], -1), rank[n.rpartition(".")[0]], -names.index(n))
        )
        lead = (
            "the recorded forward could not be replayed"
            if source is not None
            else ("the forward is finite" if calls else "no recorded forward to replay")
        )
        where = f"step {step}: {lead}; first non-finite gradient in backward order: '{first}'"
    where += _loss_note(loss)
    return [Problem(name, submodels[name], "non_finite", where) for name in bad]
