"""GradientGuardCallbackBase: the gradient guard for any LightningModule (CompositeModule runs the same one)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning_utilities.core.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from ...guard import STARVED_AFTER, GradientFlowError, GradientGuard, GuardReport
from ..epoch_logging import step_is_logged
from ..guard_modes import GUARD_MODES, GuardMode, guard_mode  # noqa: F401 (their import path before guard_modes.py)
from ..packages import check_same_package, spans_processes
from .non_finite import NonFinitePolicy, NonFiniteStepsError, refuse_non_finite_checkpoint

if TYPE_CHECKING:
    import torch


class GradientGuardCallbackBase:
    """Run the gradient guard after every backward of any ``LightningModule``.

    The guarded model is ``pl_module.<attribute>`` when ``attribute`` is given, else
    ``pl_module.model`` when that is an ``nn.Module``, else the LightningModule itself.
    After each backward (every micro-batch, and ``manual_backward``) it runs
    :meth:`GradientGuard.check`: ``mode="raise"`` stops ``fit`` with
    :class:`~composites.GradientFlowError` before the optimizer steps, ``"warn"`` warns once per
    distinct set of problems and goes on, ``"off"`` does nothing. A step whose gradients hold
    NaN/Inf under ``warn`` follows ``non_finite`` (see :class:`NonFinitePolicy`): skipped by
    default, and ``non_finite_patience`` in a row stop training. In every mode, a checkpoint
    whose weights hold NaN/Inf is refused (:class:`NonFiniteCheckpointError`). On the steps
    Lightning writes logs it logs each sub-model's gradient norm as ``grad_norm/<sub-model>``.
    Under DDP a model with a ``Conditional`` (or ``may_skip`` patterns) gets
    ``find_unused_parameters=True`` before it is wrapped; under DDP and FSDP2 every rank reaches the
    same verdict. The callback is ``composites.GradientGuardCallback`` (``pytorch_lightning``) or
    ``composites.training.lightning.GradientGuardCallback``. ``CompositeModule`` runs one of these
    itself (its ``guard`` argument): do not add another.

    Args:
        mode: ``"raise"``, ``"warn"`` or ``"off"`` (or a :data:`GuardMode`).
        may_skip: glob patterns of parameter names that may get no gradient in a step.
        starved_after: checks without a gradient that make an inactive branch ``starved``
            (``None``: never).
        check_finite: also check gradients for NaN/Inf.
        non_finite: ``"skip"`` or ``"apply"`` a step with NaN/Inf gradients (mode ``warn``).
        non_finite_patience: skipped steps in a row that stop training (``None``: never).
        log_grad_norms: log ``grad_norm/<sub-model>`` on the steps Lightning writes.
        attribute: the attribute of the LightningModule holding the model to guard.

    Example:
        >>> from composites import GradientGuardCallback
        >>> callback = GradientGuardCallback("warn", may_skip=["*.experts.*"])
        >>> callback.mode, callback.guard, callback.policy.policy
        ('warn', None, 'skip')
    """

    def __init__(
        self,
        mode: str = "raise",
        *,
        may_skip: str | Sequence[str] = (),
        starved_after: int | None = STARVED_AFTER,
        check_finite: bool = True,
        non_finite: str = "skip",
        non_finite_patience: int | None = 5,
        log_grad_norms: bool = True,
        attribute: str | None = None,
    ):
        self.mode = guard_mode(mode)
        # one string is one pattern, not its letters
        self.may_skip = [may_skip] if isinstance(may_skip, str) else [str(p) for p in may_skip]
        self.options: dict[str, Any] = {"check_finite": check_finite, "starved_after": starved_after}
        if self.may_skip:
            self.options["may_skip"] = self.may_skip
        self.policy = NonFinitePolicy(non_finite, non_finite_patience)
        self.step_skipped = False  # whether the policy skipped the optimizer step under way (NaN/Inf gradients)
        self.log_grad_norms = log_grad_norms
        self.attribute = attribute
        self.guard: GradientGuard | None = None
        self.attached = False  # the guard's hooks are on the model
        self.report: GuardReport | None = None  # the last check's report
        self._warned: set[frozenset[tuple[str, str]]] = set()
        self._loss: Tensor | None = None

    # ---------------------------------------------------------------- the guard, built in one place
    def guarded_model(self, pl_module: nn.Module) -> nn.Module:
        """The model the guard watches inside ``pl_module``."""
        if self.attribute is not None:
            return pl_module.get_submodule(self.attribute)
        model = getattr(pl_module, "model", None)
        return model if isinstance(model, nn.Module) else pl_module

    def build_guard(self, model: nn.Module, optimizer: torch.optim.Optimizer | None, trainer: Any) -> GradientGuard:
        """The guard for ``model`` (after any sharding: FSDP2 hands it the sharded model)."""
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        strategy = getattr(trainer, "strategy", None)
        pipeline = getattr(strategy, "pipeline", None)
        if pipeline is not None:  # trainer=pipeline: this rank's stage, one verdict over the pipeline
            from ...parallelism.pipeline_guard import PipelineGuard

            return PipelineGuard(
                pipeline, optimizer, replica_group=strategy.replica_group, scaler=scaler, **self.options
            )
        return GradientGuard(model, optimizer, scaler=scaler, **self.options)

    def attach(self, pl_module: nn.Module, optimizer: torch.optim.Optimizer | None, trainer: Any = None) -> None:
        """(Re)build the guard on ``pl_module``'s model; one set of hooks however often it is called."""
        self.detach()
        self.report = None
        self._warned = set()
        self.policy.skipped = 0
        self.policy.in_a_row = 0
        self.step_skipped = False
        if self.mode != "off":
            self.guard = self.build_guard(self.guarded_model(pl_module), optimizer, trainer)
            self.attached = True

    def detach(self) -> None:
        """Remove the guard's hooks (the model is left as it was); ``guard`` keeps the last guard."""
        if self.guard is not None:
            self.guard.remove()
        self.attached = False

    # ---------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_same_package(self, trainer)
        owner = getattr(pl_module, "guard_callback", None)
        if owner is not None and owner is not self and owner.mode != "off" and self.mode != "off":
            raise ValueError(
                f"{type(pl_module).__name__} runs the gradient guard itself (guard='{owner.mode}'): pass the options "
                "to it as guard=GradientGuardCallback(...) instead of adding a second one to the Trainer's callbacks"
            )
        self.prepare(trainer, pl_module, stage)

    def prepare(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Before the strategy wraps the model: routed branches under DDP, the guard under FSDP1 refused."""
        if stage == "fit" and spans_processes(trainer.strategy):
            from ..strategies.prepare import prepare_strategy

            chosen = prepare_strategy(
                trainer.strategy, self.guarded_model(pl_module), self.mode != "off", self.may_skip
            )
            if chosen:
                rank_zero_info(chosen)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not self.attached:  # a Trainer callback: the optimizers exist now
            optimizers = trainer.optimizers
            self.attach(pl_module, optimizers[0] if len(optimizers) == 1 else None, trainer)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        # the loss lets the guard tell a GradScaler overflow (finite loss, inf gradients) from a real NaN
        self._loss = loss.detach()

    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        if not self.attached:
            return
        self.report = self.guard.check(raise_error=self.mode == "raise", loss=self._loss)
        if not self.report.ok:
            key = frozenset((p.parameter, p.cause) for p in self.report.problems)
            if key not in self._warned:
                self._warned.add(key)
                rank_zero_warn(
                    f"gradient guard (guard='warn', training goes on): {GradientFlowError(self.report.problems)}"
                )

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        if self.report is None or not self.attached:
            return
        logged = step_is_logged(trainer)
        if logged and self.log_grad_norms:  # grads now hold every micro-batch of this step; a sync, so not every step
            norms = self.report.grad_norms()
            pl_module.log_dict(
                {f"grad_norm/{name}": norm for name, norm in norms.items()}, on_step=True, on_epoch=False
            )
        params = (p for group in optimizer.param_groups for p in group["params"])  # walked only for a skipped step
        step = trainer.global_step if trainer is not None else 0
        try:
            self.step_skipped = self.policy.after_check(self.report.problems, params, step)
        except NonFiniteStepsError:
            # training stops here, before Lightning writes this step's logs: the count goes to the loggers now
            for logger in getattr(trainer, "loggers", []):
                logger.log_metrics({"guard/skipped_steps": float(self.policy.skipped)}, step=step)
                logger.save()
            raise
        if logged and self.policy.skipped:
            pl_module.log("guard/skipped_steps", float(self.policy.skipped), on_step=True, on_epoch=False)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        refuse_non_finite_checkpoint(trainer, checkpoint)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.detach()  # leave the model without hooks once training is over

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.detach()


def active_guard(trainer: Any, pl_module: Any) -> GradientGuardCallbackBase | None:
    """The guard callback at work in a fit: the module's own (``CompositeModule``) or one in the Trainer's callbacks."""
    candidates = [getattr(pl_module, "guard_callback", None), *getattr(trainer, "callbacks", [])]
    for candidate in candidates:
        if isinstance(candidate, GradientGuardCallbackBase) and candidate.attached:
            return candidate
    return None
