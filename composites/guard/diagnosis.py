"""Why a parameter got no gradient: the slow path, run only when the guard's check fails."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..modules import Conditional, Sequential, is_under, join_name
from .non_finite_source import non_finite_problems
from .problems import Problem
from .reach import CallReach
from .replay import replay
from .step import StepRecord


def diagnose(
    step: StepRecord,
    missing: set[int],
    non_finite: bool,
    not_in_opt: list[int],
    starved: Mapping[int, int] | None = None,
) -> list[Problem]:
    """Every problem the check found, each with its most specific provable cause.

    Args:
        step: what the guard recorded of the step (it hands this, not itself).
        missing: indices (into ``step.names``) of trainable parameters no gradient reached.
        non_finite: some gradient holds NaN/Inf.
        not_in_opt: indices of trainable parameters the optimizer does not hold.
        starved: index -> checks in a row without a gradient, for inactive parameters that starved.

    Example:
        >>> from torch import nn
        >>> model = nn.Linear(2, 1)
        >>> names, params = map(list, zip(*model.named_parameters()))
        >>> [p.cause for p in diagnose(StepRecord(model, names, params, {n: "" for n in names}), {1}, False, [0])]
        ['unused', 'not_in_optimizer']
    """
    names, submodels = step.names, step.submodels
    problems = [
        Problem(
            path, submodel, "not_registered", "a plain tensor attribute with requires_grad=True, not an nn.Parameter"
        )
        for path, submodel in step.unregistered
    ]
    if missing or step.collective_forward:  # with collectives in the forward, every rank replays together
        problems += _explain_missing(step, sorted(missing))
    problems += [Problem(names[i], submodels[names[i]], "not_in_optimizer") for i in not_in_opt]
    problems += [
        Problem(names[i], submodels[names[i]], "starved", f"no gradient in the last {count} checks in a row")
        for i, count in sorted((starved or {}).items())
    ]
    if non_finite:  # which gradients, and the source (a replay); a step whose finite norms overflowed lands here too
        problems += non_finite_problems(step)
    return problems


def _explain_missing(step: StepRecord, missing: list[int]) -> list[Problem]:
    model, names = step.model, step.names
    calls = step.calls
    trace = replay(model, calls) if calls else []
    label = _labeler(model)
    routers = {
        join_name(path, "router"): path
        for path, m in model.named_modules()
        if isinstance(m, Conditional) and isinstance(getattr(m, "router", None), torch.nn.Module)
    }
    # the model or a direct child the loop called with grad off, and with grad on not at all
    paths = {id(m): path for path, m in model.named_modules()}
    no_grad_only = {paths[i] for i in step.no_grad_modules if i in paths} - {c.path for c in trace}
    # each graph node walked once for all calls, each call once for all parameters (per call and
    # per parameter, a deep model's diagnosis took tens of seconds)
    reach = CallReach(trace, {id(step.params[i]) for i in missing})

    problems = []
    for i in missing:
        name, pid = names[i], id(step.params[i])
        owner = name.rpartition(".")[0]
        cause, where = _explain_one(trace, owner, pid, routers, reach, label, no_grad_only)
        problems.append(Problem(name, step.submodels[name], cause, where))
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
    if not any(pid in c.used for c in trace) and not reach.calls(pid, "inputs"):
        return "unused", f"{label(owner, True)}.forward ran but never read it in this forward"
    router_of = next((cpath for rpath, cpath in routers.items() if is_under(owner, rpath)), None)
    # a soft gate whose Conditional's output carries it is cut further on, like the branches
    if router_of is not None and not any(pid in reach(c, "outputs") for c in trace if c.path == router_of):
        return (
            "non_differentiable_route",
            f"the router of {label(router_of)} made a hard choice that gives its gate no gradient",
        )
    reaching = reach.calls(pid, "outputs")
    if not any(c.path == owner for c in reaching):
        return "detached", f"inside {label(owner, True)}.forward: its output does not depend on this parameter"
    cuts = [c for c in reach.calls(pid, "inputs") if pid not in reach(c, "outputs")]
    if cuts:
        # the innermost call that dropped it, by a cut if one read it: one that never read it did not cut it
        readers = [c for c in cuts if pid in reach.graph.reachable(c.read)]
        cut = max(readers or cuts, key=lambda c: (c.depth, c.start))
        if not readers:
            made = [c for c in reaching if c.end < cut.start]
            source = (
                f"{label(max(made, key=lambda c: c.end).path)} returned an output that depends on it, but "
                if made
                else ""
            )
            return "not_in_loss", f"{source}{label(cut.path)}, which received it, never read it in this forward"
        if not cut.grad:
            return "no_grad", f"{label(cut.path)} ran under torch.no_grad() on a tensor that needed its gradient"
        return (
            "detached",
            f"inside {label(cut.path, True)}.forward, which received it with gradient but returned it without",
        )
    last = max(reaching, key=lambda c: c.end)
    if last.parent is None:  # the output of a replayed call still had it: the cut is in the loop
        then = next((c for c in trace if c.parent is None and c.start > last.end), None)
        if last.path == "" or then is None:  # the last output that carries it: the loss does not use it
            return "not_in_loss", f"{label(last.path)} returned an output that depends on it, but the loss does not"
        where = f"between {label(last.path)} and {label(then.path)}"
        return "detached", where + ", in the code that calls them: the gradient does not flow from one to the next"
    parent = last.parent
    after = next((c for c in trace if c.parent is parent and c.start > last.end), None)
    if isinstance(parent.module, Sequential) and after is not None:
        return "detached", f"between stage {label(last.path)} and stage {label(after.path)} of {label(parent.path)}"
    where = f"inside {label(parent.path, True)}.forward, after {label(last.path)}"
    return "detached", where + (f", before {label(after.path)}" if after is not None else "")


def _not_run(trace, owner, label, no_grad_only) -> tuple[str, str]:
    """Why no call of ``owner`` was traced: the loop ran it (or the model) under no_grad, or it never ran."""
    around = [path for path in no_grad_only if is_under(owner, path)]
    if around:
        path = max(around, key=len)
        return "no_grad", f"{label(path)} ran under torch.no_grad()/inference_mode(), in the code that calls it"
    if not trace:
        return (
            "unused",
            "neither the model nor its sub-models ran with gradients on since the last check (check() once per backward)",
        )
    ran = [c for c in trace if is_under(owner, c.path)]
    parent = max(ran, key=lambda c: len(c.path), default=None)
    return "unused", f"{label(owner)} never ran in forward" + (f", though {label(parent.path)} did" if parent else "")


def _labeler(model: torch.nn.Module):
    kind = type(model).__name__

    def label(path: str, code: bool = False) -> str:
        """How a module is named in the report: by path, the model itself by its class."""
        return f"'{path}'" if path else (kind if code else f"the model ({kind})")

    return label
