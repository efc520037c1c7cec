"""Why a parameter got no gradient: the slow path, run only when the guard's check fails."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..modules import Conditional, Sequential
from .finite import stored
from .problems import Problem
from .replay import Call, reachable, replay

if TYPE_CHECKING:
    from .gradient_guard import GradientGuard


def diagnose(guard: GradientGuard, missing: set[int], non_finite: bool, not_in_opt: list[int]) -> list[Problem]:
    """Every problem the check found, each with its most specific provable cause."""
    names, submodels = guard.names, guard.submodels
    problems = [
        Problem(
            path, submodel, "not_registered", "a plain tensor attribute with requires_grad=True, not an nn.Parameter"
        )
        for path, submodel in guard._unregistered
    ]
    if missing:
        problems += _explain_missing(guard, sorted(missing))
    problems += [Problem(names[i], submodels[names[i]], "not_in_optimizer") for i in not_in_opt]
    if non_finite:  # which gradients, read back once: a step whose finite norms overflowed lands here too
        held = [(name, p.grad) for name, p in zip(names, guard.params) if p.grad is not None]
        finite = torch.stack([torch.isfinite(stored(g)).all() for _, g in held]).tolist() if held else []
        problems += [Problem(name, submodels[name], "non_finite") for (name, _), ok in zip(held, finite) if not ok]
    return problems


def _explain_missing(guard: GradientGuard, missing: list[int]) -> list[Problem]:
    model, names = guard.model, guard.names
    calls = guard._replayable()
    trace = replay(model, calls) if calls else []
    label = _labeler(model)
    routers = {
        f"{path}.router" if path else "router": path
        for path, m in model.named_modules()
        if isinstance(m, Conditional) and "router" in m._modules
    }
    # the model or a direct child the loop called with grad off, and with grad on not at all
    paths = {id(m): path for path, m in model.named_modules()}
    no_grad_only = {paths[i] for i in guard._no_grad_calls if i in paths} - {c.path for c in trace}
    reach_cache: dict[tuple[int, str], set[int]] = {}

    def reach(call: Call, side: str) -> set[int]:
        key = (id(call), side)
        if key not in reach_cache:
            reach_cache[key] = reachable(getattr(call, side))
        return reach_cache[key]

    problems = []
    for i in missing:
        name, pid = names[i], id(guard.params[i])
        owner = name.rpartition(".")[0]
        cause, where = _explain_one(trace, owner, pid, routers, reach, label, no_grad_only)
        problems.append(Problem(name, guard.submodels[name], cause, where))
    return problems


def _explain_one(trace, owner, pid, routers, reach, label, no_grad_only) -> tuple[str, str]:
    own = [c for c in trace if c.path == owner]
    if not own:
        users = [c for c in trace if pid in c.used]
        if not users:
            return _not_run(trace, owner, label, no_grad_only)
        user = max(users, key=lambda c: c.depth)  # not its owner's forward, but some code used it
        if not any(c.used[pid] for c in users):
            return "no_grad", f"inside {label(user.path, True)}.forward, used under torch.no_grad()/inference_mode()"
        owner, own = user.path, [c for c in trace if c.path == user.path]
    if not any(c.grad for c in own):
        return "no_grad", f"{label(owner)} ran under torch.no_grad()/inference_mode()"
    router_of = next(
        (cpath for rpath, cpath in routers.items() if owner == rpath or owner.startswith(rpath + ".")), None
    )
    # a soft gate whose Conditional's output carries it is cut further on, like the branches
    if router_of is not None and not any(pid in reach(c, "outputs") for c in trace if c.path == router_of):
        return (
            "non_differentiable_route",
            f"the router of {label(router_of)} made a hard choice that gives its gate no gradient",
        )
    reaching = [c for c in trace if pid in reach(c, "outputs")]
    if not any(c.path == owner for c in reaching):
        return "detached", f"inside {label(owner, True)}.forward: its output does not depend on this parameter"
    cuts = [c for c in trace if pid in reach(c, "inputs") and pid not in reach(c, "outputs")]
    if cuts:
        cut = max(cuts, key=lambda c: (c.depth, c.start))  # the innermost call that dropped it
        if not cut.grad:
            return "no_grad", f"{label(cut.path)} ran under torch.no_grad() on a tensor that needed its gradient"
        return (
            "detached",
            f"inside {label(cut.path, True)}.forward, which received it with gradient but returned it without",
        )
    last = max(reaching, key=lambda c: c.end)
    if last.parent is None:  # the output of a replayed call still had it: the cut is in the loop
        if last.path == "":
            return (
                "detached",
                "after the model's forward: its output depends on this parameter but the loss does not (detached, converted, or left out of the loss)",
            )
        then = next((c for c in trace if c.parent is None and c.start > last.end), None)
        where = (
            f"between {label(last.path)} and {label(then.path)}"
            if then is not None
            else f"after {label(last.path)} returned"
        )
        return "detached", where + ", in the code that calls them: the gradient does not flow from one to the next"
    parent = last.parent
    after = next((c for c in trace if c.parent is parent and c.start > last.end), None)
    if isinstance(parent.module, Sequential) and after is not None:
        return "detached", f"between stage {label(last.path)} and stage {label(after.path)} of {label(parent.path)}"
    where = f"inside {label(parent.path, True)}.forward, after {label(last.path)}"
    return "detached", where + (f", before {label(after.path)}" if after is not None else "")


def _not_run(trace, owner, label, no_grad_only) -> tuple[str, str]:
    """Why no call of ``owner`` was traced: the loop ran it (or the model) under no_grad, or it never ran."""
    around = [path for path in no_grad_only if path == "" or owner == path or owner.startswith(path + ".")]
    if around:
        path = max(around, key=len)
        return "no_grad", f"{label(path)} ran under torch.no_grad()/inference_mode(), in the code that calls it"
    if not trace:
        return (
            "unused",
            "neither the model nor its sub-models ran with gradients on since the last check (check() once per backward)",
        )
    ran = [c for c in trace if owner.startswith(c.path + ".") or c.path == ""]
    parent = max(ran, key=lambda c: len(c.path), default=None)
    return "unused", f"{label(owner)} never ran in forward" + (f", though {label(parent.path)} did" if parent else "")


def _labeler(model: torch.nn.Module):
    kind = type(model).__name__

    def label(path: str, code: bool = False) -> str:
        """How a module is named in the report: by path, the model itself by its class."""
        return f"'{path}'" if path else (kind if code else f"the model ({kind})")

    return label
