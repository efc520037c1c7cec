"""GradientGuard: after each backward, prove every trainable parameter got a gradient."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ..modules import Conditional
from .diagnosis import diagnose
from .finite import any_non_finite
from .hooks import Arrived, Recorder
from .problems import GradientFlowError, GuardReport, Problem
from .structure import find_unregistered, grouped_grad_norms, submodel_names
from .sync import gather_problems, is_distributed, reduce_flags


class GradientGuard:
    """Check, after every ``loss.backward()``, that each trainable parameter got a gradient.

    "Got a gradient" is exact per backward: a hook on every parameter fires when a gradient
    arrives for it, so leftover gradients from an earlier micro-batch or a zeroed
    ``.grad`` (``zero_grad(set_to_none=False)``) cannot hide a cut. The per-step check is a
    set difference plus, with ``check_finite``, one fused reduction and one host read. Only
    when something is wrong does the guard replay the last forward with tracing hooks to name
    the cause (detached, no_grad, unused, non_differentiable_route, ...) and where it happened.

    Args:
        model: any ``nn.Module``; composites add branch names and routing knowledge.
        optimizer: when given, trainable parameters it does not hold are reported
            (``not_in_optimizer``); also settable later with :meth:`set_optimizer`.
        check_finite: also report NaN/Inf gradients (``non_finite``).
        scaler: a ``torch.amp.GradScaler``; while it is enabled, non-finite gradients with a
            finite loss are an overflow step the scaler skips, not a problem, unless that
            happens ``overflow_patience`` steps in a row.
        overflow_patience: consecutive overflow steps tolerated under a scaler.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 1))
        >>> guard = GradientGuard(model)
        >>> model(torch.randn(2, 3)).sum().backward()
        >>> guard.check().checked
        4
        >>> h = model[0](torch.randn(2, 3)).detach()
        >>> model[1](h).sum().backward()
        >>> guard.check()
        Traceback (most recent call last):
          ...
        composites.guard.problems.GradientFlowError: 2 parameters did not get a proper gradient in this backward:
        ...
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        check_finite: bool = True,
        scaler: Any = None,
        overflow_patience: int = 20,
    ):
        self.model = model
        named = list(model.named_parameters())  # shared parameters once, under their first name
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.submodels = submodel_names(model, self.names)
        self.check_finite, self.scaler, self.overflow_patience = check_finite, scaler, overflow_patience
        self._reached: set[int] = set()
        # grad-enabled calls, kept until the next check so a failure can be replayed: the
        # model's own and, apart, its direct children's (a loop may call those itself: encoder
        # then head), so that many child calls in one forward (an RNN cell stepped 30 times)
        # cannot push the model's call out
        self._root_calls: deque[tuple[nn.Module, tuple, dict]] = deque(maxlen=16)
        self._calls: deque[tuple[nn.Module, tuple, dict]] = deque(maxlen=16)
        self._no_grad_calls: set[int] = set()  # ids of those modules called with grad off: the loop's no_grad
        self._overflows = 0
        recorder = Recorder(self)
        self._handles = [m.register_forward_pre_hook(recorder, with_kwargs=True) for m in (model, *model.children())]
        self._hooked: set[int] = set()
        # a lazy parameter cannot be hooked before its first forward; check() hooks it after
        self._hook({i for i, p in enumerate(self.params) if p.requires_grad and not is_lazy(p)})
        index = {n: i for i, n in enumerate(self.names)}
        self._conditionals = [
            (
                path,
                c,
                {
                    b: {i for n, i in index.items() if n.startswith(f"{path}.{b}." if path else f"{b}.")}
                    for b in c.branch_names
                },
            )
            for path, c in model.named_modules()
            if isinstance(c, Conditional)
        ]
        for _, conditional, _ in self._conditionals:  # a forward made before the guard existed is not this step's
            conditional.drain_ran()
        self._unregistered = self._scan()
        self._scanned_after_forward = False
        self.optimizer: torch.optim.Optimizer | None = None
        self._optimizer_key: tuple[int, int] | None = None
        self._not_in_optimizer: list[int] = []
        self.set_optimizer(optimizer)

    def _scan(self) -> list[tuple[str, str]]:
        """Unregistered tensors as (attribute path, sub-model) pairs."""
        found = [path for path, _ in find_unregistered(self.model)]
        return list(submodel_names(self.model, found).items())

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Check from now on that every trainable parameter is in ``optimizer``."""
        self.optimizer, self._optimizer_key = optimizer, None

    def remove(self) -> None:
        """Remove the guard's hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._hooked.clear()

    def _hook(self, indices: set[int]) -> None:
        """Mark each parameter as reached when a gradient arrives for it (frozen ones cannot be hooked).

        A tensor hook, not a post-accumulate one: under torch.compile the compiled backward
        visits every parameter and hands the unreached ones ``None``, which only this hook sees.
        """
        add = self._reached.add
        for i in indices:
            self._handles.append(self.params[i].register_hook(Arrived(add, i).mark))
        self._hooked |= indices

    def _record_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not torch.is_grad_enabled():
            self._no_grad_calls.add(id(module))
        elif module is self.model:
            self._root_calls.append((module, args, kwargs))
        else:
            self._calls.append((module, args, kwargs))

    def _replayable(self) -> list[tuple[nn.Module, tuple, dict]]:
        """The model's own calls since the last check, else the calls a loop made to its sub-models."""
        return list(self._root_calls or self._calls)

    def _missing_from_optimizer(self) -> list[int]:
        groups = self.optimizer.param_groups
        key = (len(groups), sum(len(g["params"]) for g in groups))
        if key != self._optimizer_key:  # recomputed only when the optimizer's groups change
            held = {id(p) for g in groups for p in g["params"]}
            self._not_in_optimizer = [i for i, p in enumerate(self.params) if id(p) not in held]
            self._optimizer_key = key
        return [i for i in self._not_in_optimizer if self.params[i].requires_grad]

    def _inactive(self) -> set[int]:
        """Parameters of Conditional branches that were routed out in the forwards since the last check."""
        inactive: set[int] = set()
        for _, conditional, branch_params in self._conditionals:
            ran = conditional.drain_ran()
            if ran:  # a Conditional that never ran excuses nothing: its branches are 'unused'
                for branch, indices in branch_params.items():
                    if branch not in ran:
                        inactive |= indices
        return inactive

    def _non_finite(self, loss: Tensor | None) -> tuple[bool, bool]:
        """(a NaN/Inf gradient to report, a GradScaler overflow step let through); one fused pass, one host read."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads or not any_non_finite(grads):
            self._overflows = 0
            return False, False
        # only a finite loss makes it an overflow step: a NaN loss is a real NaN, and neither
        # counts toward the patience nor resets the count
        if (
            self.scaler is not None
            and self.scaler.is_enabled()
            and (loss is None or bool(torch.isfinite(loss.detach()).all()))
        ):
            self._overflows += 1
            if self._overflows <= self.overflow_patience:
                return False, True  # an overflow step: the scaler skips it and lowers its scale
        return True, False

    def check(self, raise_error: bool = True, loss: Tensor | None = None) -> GuardReport:
        """Check the backward(s) since the last call; call it right after each ``loss.backward()``.

        Args:
            raise_error: raise :class:`GradientFlowError` on problems (else return them in the report).
            loss: the loss just backpropagated; lets a GradScaler overflow be told from a real NaN.

        Returns:
            A :class:`GuardReport` (``ok``, counts, ``grad_norms()``).
        """
        if not self._scanned_after_forward and (
            self._root_calls or self._calls
        ):  # catches tensors set lazily in the first forward
            self._unregistered, self._scanned_after_forward = self._scan(), True
        trainable = {i for i, p in enumerate(self.params) if p.requires_grad}
        inactive = self._inactive() & trainable
        unhooked = {i for i in trainable - self._hooked if not is_lazy(self.params[i])}
        if unhooked:  # unfrozen (or materialized) since the guard was built: checked from the next backward on
            self._hook(unhooked)
        missing = trainable - self._reached - inactive - unhooked
        not_in_opt = self._missing_from_optimizer() if self.optimizer is not None else []
        non_finite, overflow = self._non_finite(loss) if self.check_finite else (False, False)
        distributed = is_distributed()
        explain = missing
        if distributed:  # one collective: a parameter is fine when any rank reached it
            flagged, non_finite = reduce_flags(self.params, self._reached, missing, non_finite)
            # a rank explains only what it missed itself: where it was routed out, another rank has the cause
            missing, explain = flagged, flagged & missing
        problems: list[Problem] = []
        if missing or non_finite or not_in_opt or self._unregistered:
            problems = diagnose(self, explain, non_finite, not_in_opt)
            if distributed:
                problems = gather_problems(problems)
        shown = inactive - self._reached
        report = GuardReport(
            checked=len(trainable),
            frozen=len(self.params) - len(trainable),
            inactive=len(shown),
            problems=problems,
            overflow=overflow,
            _names=self.names,
            _trainable=trainable,
            _inactive=shown,
            _norms=self.grad_norms,
        )
        self._reached.clear()
        self._root_calls.clear()
        self._calls.clear()
        self._no_grad_calls.clear()
        if problems and raise_error:
            raise GradientFlowError(problems)
        return report

    def grad_norms(self) -> dict[str, float]:
        """L2 norm of each sub-model's current gradient (qualified name -> norm); one host read."""
        return grouped_grad_norms(zip(self.names, self.params), self.submodels)
