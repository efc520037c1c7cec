"""GradientGuard: after each backward, prove every trainable parameter got a gradient."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .diagnosis import diagnose
from .forward_state import StateCapture
from .hooks import Arrived, record_calls, uncompiled
from .inactive import STARVED_AFTER, InactiveParameters
from .optimizer_coverage import OptimizerCoverage
from .overflow import FiniteCheck
from .problems import GradientFlowError, GuardReport, Problem
from .sharded import ShardedArrivals
from .step import RecordedCall, StepRecord
from .structure import grouped_grad_norms, require_module, submodel_names, unregistered_tensors
from .sync import RankAgreement, is_distributed


class GradientGuard:
    """Check, after every ``loss.backward()``, that each trainable parameter got a gradient.

    "Got a gradient" is exact per backward: a hook on every parameter fires when a gradient
    arrives for it, so leftover gradients from an earlier micro-batch or a zeroed
    ``.grad`` (``zero_grad(set_to_none=False)``) cannot hide a cut. The per-step check is a
    set difference plus, with ``check_finite``, one fused reduction and one host read. Only
    when something is wrong does the guard replay the last forward, from the random state and
    buffers it started with, with tracing hooks to name the cause (detached, no_grad, unused,
    not_in_loss, non_differentiable_route, ...) and where it happened.

    Branches a ``Conditional`` routed out and parameters matching ``may_skip`` may go without a
    gradient in a step: they are inactive, not problems, until ``starved_after`` checks in a row
    (a dead expert, a collapsed gate, a drop rate of 1.0; steps routed by name do not count).

    Args:
        model: any ``nn.Module``; composites add branch names and routing knowledge. A
            ``torch.compile``-d model (or one compiled after the guard was built) is checked
            the same way, its parameters named as in the eager model; the graphs compiled
            during its calls draw random numbers as eager code does (Inductor's
            ``fallback_random``), so the replay takes the path the compiled forward took.
        optimizer: when given, trainable parameters it does not hold are reported
            (``not_in_optimizer``); also settable later with :meth:`set_optimizer`.
        check_finite: also report NaN/Inf gradients (``non_finite``); a failing check names
            the source in ``where``: the first module whose output went non-finite in
            forward, else the first bad gradient in backward order, with the step.
        scaler: a ``torch.amp.GradScaler``; while it is enabled, non-finite gradients with a
            finite loss are an overflow step the scaler skips, not a problem, unless that
            happens ``overflow_patience`` steps in a row.
        overflow_patience: consecutive overflow steps tolerated under a scaler.
        may_skip: glob patterns over parameter names (``"*.experts.*"``, ``"encoder.layers.*"``)
            for parameters that routing the guard does not own may leave without a gradient
            in a step (a Hugging Face MoE router, LayerDrop, stochastic depth). Each pattern
            must match some parameter.
        starved_after: checks in a row without a gradient that make an inactive branch or
            may-skip parameter ``starved`` (``None``: off). The default, 200, gives no false
            alarm for 8 experts top-1 ((7/8)**200 = 2.6e-12) or LayerDrop 0.1 (0.1**200).
        group: under torch.distributed, the process group of the ranks that hold these same
            parameters (data-parallel copies, whose gradients are reduced): a parameter is fine
            when one of them reached it. Default: every rank. A pipeline stage's guard gives
            its stage's data-parallel group (see ``composites.parallelism.pipeline_guard``).

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
        >>> guard = GradientGuard(model, may_skip=["0.*"])  # layer 0 may sit a step out
        >>> model[1](torch.randn(2, 4)).sum().backward()
        >>> guard.check().inactive_names
        ['0.bias', '0.weight']
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        check_finite: bool = True,
        scaler: Any = None,
        overflow_patience: int = 20,
        may_skip: Sequence[str] = (),
        starved_after: int | None = STARVED_AFTER,
        group: Any = None,
    ):
        self.group = group
        self.model = model = uncompiled(require_module(model))  # a compiled model: its eager module, named as such
        self.check_finite = check_finite
        self._finite = FiniteCheck(scaler, overflow_patience)
        self._inactive = InactiveParameters(may_skip, starved_after)
        self._reached: set[int] = set()
        # grad-enabled calls kept until the next check, for a replay: the model's own, else (a loop
        # calling encoder then head itself) its direct children's, kept apart so that many child calls
        # in one forward (an RNN cell stepped 30 times) cannot push the model's call out
        self._root_calls: deque[RecordedCall] = deque(maxlen=16)
        self._calls: deque[RecordedCall] = deque(maxlen=16)
        self._no_grad_calls: set[int] = set()  # ids of those modules called with grad off: the loop's no_grad
        self._checks = 0
        self._param_handles: list[Any] = []
        self._sharded: ShardedArrivals | None = None
        self._ranks = RankAgreement(group)  # one verdict on every rank, whatever parameters each holds
        self._hooked: set[int] = set()
        self._capture = StateCapture(model)
        self.set_optimizer(optimizer)
        self.refresh_parameters()  # a may_skip pattern that matches nothing raises here, before any hook is placed
        self._handles = record_calls(self, model)
        self._inactive.drain()  # a forward made before the guard existed is not this step's
        self._unregistered = unregistered_tensors(self.model)
        self._scanned_after_forward = False

    def refresh_parameters(self) -> None:
        """Read the parameters again (names, sub-models, branches, may-skip matches) and hook them anew.

        Call it when they were replaced (sharded, reloaded); the old parameters' hooks are removed.
        """
        named = list(self.model.named_parameters())  # shared parameters once, under their first name
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.submodels = submodel_names(self.model, self.names)
        self._ranks.forget()
        self._inactive.refresh(self.model, self.names)  # checks the may_skip patterns first
        for handle in self._param_handles:
            handle.remove()
        self._param_handles.clear()
        if self._sharded is not None:
            self._sharded.remove()
        self._sharded = ShardedArrivals.of(self.model, self.names)  # FSDP2: hooks on the unsharded tensors
        self._hooked.clear()
        # a lazy parameter cannot be hooked before its first forward; check() hooks it after
        self._hook({i for i, p in enumerate(self.params) if p.requires_grad and not is_lazy(p)})
        self._capture.refresh()
        self._coverage.forget()

    def set_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Check from now on that every trainable parameter is in ``optimizer``."""
        self.optimizer = optimizer
        self._coverage = OptimizerCoverage(optimizer)

    def remove(self) -> None:
        """Remove the guard's hooks from the model."""
        for handle in (*self._handles, *self._param_handles):
            handle.remove()
        if self._sharded is not None:
            self._sharded.remove()
        self._handles.clear()
        self._param_handles.clear()
        self._hooked.clear()

    def _hook(self, indices: set[int]) -> None:
        """Mark each parameter as reached when a gradient arrives for it (frozen ones cannot be hooked).

        A tensor hook, not a post-accumulate one: under torch.compile the compiled backward
        visits every parameter and hands the unreached ones ``None``, which only this hook sees.
        """
        add, sharded, params = self._reached.add, self._sharded, self.params
        for i in indices:
            mark = Arrived(add, i).mark
            self._param_handles.append(sharded.hook(i, mark) if sharded is not None else params[i].register_hook(mark))
        self._hooked |= indices

    def record_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Note a forward call of the model or a direct child (the forward pre-hook calls it): a call with
        gradients on is kept with the random state (and the step's first, the buffers) it starts from."""
        if not torch.is_grad_enabled():
            self._no_grad_calls.add(id(module))
        elif module is self.model:
            self._root_calls.append(RecordedCall(module, args, kwargs, self._capture(not self._root_calls)))
        elif not self._root_calls:  # the model's own calls are the ones replayed: children inside need nothing
            self._calls.append(RecordedCall(module, args, kwargs, self._capture(not self._calls)))

    def check(self, raise_error: bool = True, loss: Tensor | None = None) -> GuardReport:
        """Check the backward(s) since the last call; call it right after each ``loss.backward()``.

        Args:
            raise_error: raise :class:`GradientFlowError` on problems (else return them in the report).
            loss: the loss just backpropagated; lets a GradScaler overflow be told from a real NaN.

        Returns:
            A :class:`GuardReport` (``ok``, counts, ``grad_norms()``).
        """
        self._checks += 1  # the step a non_finite problem names
        if not self._scanned_after_forward and (
            self._root_calls or self._calls
        ):  # catches tensors set lazily in the first forward
            self._unregistered = unregistered_tensors(self.model)
            self._scanned_after_forward = True
        trainable = {i for i, p in enumerate(self.params) if p.requires_grad}
        inactive, countable = self._inactive.drain()
        inactive &= trainable
        unhooked = {i for i in trainable - self._hooked if not is_lazy(self.params[i])}
        if unhooked:  # unfrozen (or materialized) since the guard was built: checked from the next backward on
            self._hook(unhooked)
        missing = trainable - self._reached - inactive - unhooked
        not_in_opt = self._coverage.missing(self.params)
        non_finite, overflow = self._finite(self.params, loss) if self.check_finite else (False, False)
        distributed = is_distributed(self.group)
        explain, reached, elsewhere = missing, self._reached, False
        if distributed:  # one collective: a parameter is fine when any rank reached it
            flagged, non_finite, elsewhere, reached = self._ranks.reduce(self, self._reached, missing, non_finite)
            # a rank explains only what it missed itself: where it was routed out, another rank has the cause
            missing, explain = flagged, flagged & missing
        starved = self._inactive.starved(countable & trainable, reached, inactive - missing)
        problems: list[Problem] = []
        if self._ranks.agree(bool(missing or non_finite or not_in_opt or self._unregistered or starved or elsewhere)):
            calls, no_grad = list(self._root_calls or self._calls), frozenset(self._no_grad_calls)
            step = StepRecord(
                self.model,
                self.names,
                self.params,
                self.submodels,
                calls,
                no_grad,
                self._unregistered,
                check=self._checks,
                loss=loss,
                collective_forward=distributed and self._ranks.spread,  # all-to-alls in it: every rank replays
            )
            explained = diagnose if self._sharded is None else self._sharded.diagnose
            problems = explained(step, explain, non_finite, not_in_opt, starved)
            if distributed:
                problems = self._ranks.problems(problems)
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
        if self._sharded is not None:  # whole parameters, not this rank's shard (a collective: every rank calls it)
            return self._sharded.grad_norms(self.names, self.params, self.submodels)
        return grouped_grad_norms(zip(self.names, self.params), self.submodels)

    @property
    def attached(self) -> bool:
        """Whether the guard's hooks are on the model (:meth:`remove` takes them off)."""
        return bool(self._handles or self._param_handles)

    @property
    def reached(self) -> list[str]:
        """Names of the parameters a backward reached since the last check (each check starts afresh)."""
        return [self.names[i] for i in sorted(self._reached)]

    @property
    def recorded_calls(self) -> list[RecordedCall]:
        """The forward calls kept for a replay until the next check: the model's own, else its children's."""
        return list(self._root_calls or self._calls)
