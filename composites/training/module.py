"""CompositeModuleBase: train any composite with Lightning, one optimizer, a gradient guard each backward.

The ``LightningModule`` classes are declared per package: ``composites.CompositeModule`` (``pytorch_lightning``)
and ``composites.training.lightning.CompositeModule``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from lightning_utilities.core.rank_zero import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from ..guard import GradientGuard, GuardReport
from ..modules import Conditional
from .callbacks.gradient_guard import GradientGuardCallbackBase
from .epoch_logging import epoch_means, log_epoch, reset_epoch, stage_metrics, step_is_logged
from .guard_modes import GuardMode
from .inputs import check_loss_and_balancing, check_optimizer_factory, check_trainable, split_batch
from .packages import composites_classes, package_of, spans_processes
from .param_groups import build_param_groups, plain
from .routing_terms import routing_terms
from .schedules import configure_schedule


class CompositeModuleBase:
    """A ``LightningModule`` around any model (composite or not), guarded after every backward.

    Batches are ``(input, target)``; the input (a tensor, or a mapping such as the views a
    ``Parallel`` takes) is passed to ``model`` as one argument. The module builds ONE
    optimizer over every trainable parameter (see :func:`build_param_groups`), and after every
    backward (each micro-batch under ``accumulate_grad_batches``, and every
    ``self.manual_backward(loss)`` under manual optimization, since Lightning calls
    ``on_after_backward`` from both) it runs :meth:`GradientGuard.check`:

    - ``guard="raise"``: a :class:`GradientFlowError` leaves ``trainer.fit`` at the first bad
      backward, before the optimizer steps;
    - ``guard="warn"``: a rank-zero warning with the table, once per distinct set of problems;
    - ``guard="off"``: no hooks, no check, no gradient-norm logging.

    This base class holds the behaviour; the ``LightningModule`` is ``composites.CompositeModule``
    (``pytorch_lightning``) or ``composites.training.lightning.CompositeModule`` (``lightning``).

    It logs the sample-weighted mean loss and the metrics once per epoch (``train/loss_epoch``,
    ``val/loss``, ``test/loss``, ``train/acc``, ``val/acc``, ...; val/test over all DDP ranks),
    and on the steps Lightning writes (every ``trainer.log_every_n_steps``) the step's training
    loss (``train/loss_step``), each group's learning rate (``lr/<group>``) and each sub-model's
    gradient L2 norm (``grad_norm/<sub-model>``). A ``self.log`` per step would cost more than a
    small model's step, so between those steps only the metrics and a loss sum on the device are
    updated: the progress bar's ``train/loss_step`` changes only then (and on an epoch's last
    batch). ``predict_step`` returns the model's outputs.

    Args:
        model: the model to train.
        loss: an ``nn.Module`` or callable ``(output, target) -> scalar``. Trainable parameters
            of a loss module join the optimizer too (group names see them as ``loss.<name>``).
        optimizer: a partial taking parameter groups, e.g. ``partial(torch.optim.Adam, lr=1e-3)``
            (Hydra: ``_partial_: true``).
        scheduler: a partial taking the optimizer and returning an LR scheduler (stepped each
            epoch; a ``ReduceLROnPlateau`` watches ``val/loss``) or a Lightning scheduler dict,
            or such a dict whose ``"scheduler"`` is that partial (what YAML can say:
            ``{scheduler: {_target_: ..., _partial_: true}, interval: step}``).
        metrics: a torchmetrics ``Metric`` or ``MetricCollection``, cloned per stage with the
            prefixes ``train/``, ``val/``, ``test/`` (a collection's keys name the metrics).
        param_groups: e.g. ``[{"prefix": "encoder", "lr": 1e-4}]``; see :func:`build_param_groups`.
        guard: ``"raise"`` (default), ``"warn"`` or ``"off"``; or a mapping of
            :class:`GradientGuardCallback` arguments (``{"mode": "warn", "may_skip": ["experts.*"]}``,
            what the config's ``module.guard`` node gives); or a ``GradientGuardCallback`` itself.
            The module runs it through its own hooks. Under ``warn`` a step with NaN/Inf gradients is skipped (the default
            policy) and a checkpoint with NaN/Inf weights is never written.
        load_balancing: weight of the Switch-Transformer load-balancing loss of every
            score-routed :class:`Conditional`, added to the training loss so a learned gate
            keeps using all its experts (0 turns it off). Logged as ``train/load_balancing_step``
            and ``train/load_balancing_epoch`` (1.0 is perfectly balanced).

    With capacity routing (``Conditional(..., capacity_factor=...)``) the fraction of
    (sample, branch) pairs dropped past capacity is logged per epoch as ``train/dropped_epoch``,
    ``val/dropped`` and ``test/dropped``, averaged over such Conditionals.

    Example:
        >>> from functools import partial
        >>> import torch
        >>> from torch import nn
        >>> from composites import CompositeModule, Sequential
        >>> model = Sequential({"encoder": nn.Linear(4, 8), "head": nn.Linear(8, 3)})
        >>> module = CompositeModule(model, nn.CrossEntropyLoss(), partial(torch.optim.Adam, lr=1e-3),
        ...                          param_groups=[{"prefix": "encoder", "lr": 1e-4}])
        >>> optimizer = module.configure_optimizers()
        >>> [(g["name"], len(g["params"]), g["lr"]) for g in optimizer.param_groups]
        [('encoder', 2, 0.0001), ('default', 2, 0.001)]
        >>> module.loss_fn(module(torch.randn(5, 4)), torch.tensor([0, 1, 2, 0, 1])).backward()
        >>> module.on_after_backward()  # what Lightning calls after each backward
        >>> module.report.ok, module.report.checked
        (True, 4)
        >>> CompositeModule(model, nn.MSELoss(), torch.optim.SGD, guard={"mode": "warn", "may_skip": ["head.*"]}).guard_callback.may_skip
        ['head.*']
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module | Callable[[Any, Any], Tensor],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        metrics: Metric | MetricCollection | None = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        guard: str | GuardMode | Mapping[str, Any] | GradientGuardCallbackBase = "raise",
        load_balancing: float = 0.0,
    ):
        super().__init__()
        check_optimizer_factory(optimizer)
        check_loss_and_balancing(loss, load_balancing)
        callback = guard_callback(guard, package_of(self))
        param_groups = plain(param_groups) if param_groups is not None else None
        # Only plain values go into hparams: checkpoints are read with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["model", "loss", "optimizer", "scheduler", "metrics", "guard"])
        self.hparams["guard"] = callback.mode
        self.model = model
        self.loss_fn = loss
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.param_groups = param_groups
        self.guard_callback = callback
        self.load_balancing = load_balancing
        self.gates = [m for m in model.modules() if isinstance(m, Conditional)] if load_balancing else []
        self.train_metrics = stage_metrics(metrics, "train")
        self.val_metrics = stage_metrics(metrics, "val")
        self.test_metrics = stage_metrics(metrics, "test")
        self.capacity_gates = [
            m for m in model.modules() if isinstance(m, Conditional) and m.capacity_factor is not None
        ]
        # loss sums, logged once per epoch
        self.epoch_means = epoch_means(load_balancing=bool(self.gates), dropped=bool(self.capacity_gates))
        # training losses of the optimizer step under way: they join the epoch mean once the step is
        # taken, and not at all when the guard skips it (NaN/Inf gradients), so one bad step does not
        # make the epoch's train/loss NaN
        self.unstepped_losses: list[tuple[Tensor, int]] = []

    @property
    def guard_mode(self) -> str:
        """``"raise"``, ``"warn"`` or ``"off"``."""
        return self.guard_callback.mode

    @property
    def guard(self) -> GradientGuard | None:
        """The guard on the model (built by ``configure_optimizers``; ``None`` with ``guard="off"``)."""
        return self.guard_callback.guard

    @guard.setter
    def guard(self, guard: GradientGuard | None) -> None:  # scripts/diagnose.py runs its own check
        self.guard_callback.detach()
        self.guard_callback.guard = guard

    @property
    def report(self) -> GuardReport | None:
        """The last check's report."""
        return self.guard_callback.report

    def forward(self, x: Any) -> Any:
        return self.model(x)

    # ---------------------------------------------------------------- optimizer and guard: the callback's hooks
    def setup(self, stage: str) -> None:
        # Runs before the strategy wraps the model: DDP must learn about routed (Conditional)
        # branches now, and FSDP1 with the guard on is refused now rather than mid-training.
        self.guard_callback.prepare(self.trainer, self, stage)

    def configure_model(self) -> None:
        # FSDP2 (trainer=fsdp): one unit per sub-model, then the root; the guard is built after, on the shards
        if self._trainer is None or not spans_processes(self._trainer.strategy):  # load_from_checkpoint calls it too
            return
        from .strategies.prepare import configure_sharding

        chosen = configure_sharding(self.trainer.strategy, self.model, self.guard_callback.may_skip)
        if chosen:
            rank_zero_info(chosen)

    def configure_optimizers(self) -> Any:
        extra = (
            [(f"loss.{n}", p) for n, p in self.loss_fn.named_parameters()]
            if isinstance(self.loss_fn, nn.Module)
            else []
        )
        optimizer = self.optimizer_factory(check_trainable(build_param_groups(self.model, self.param_groups, extra)))
        # Given the optimizer, the guard reports any trainable parameter it does not hold; configure_optimizers
        # may run again (a second fit): one set of hooks.
        self.guard_callback.attach(self, optimizer, self._trainer)
        return configure_schedule(optimizer, self.scheduler_factory)

    def on_before_backward(self, loss: Tensor) -> None:
        self.guard_callback.on_before_backward(self._trainer, self, loss)

    def on_after_backward(self) -> None:
        self.guard_callback.on_after_backward(self._trainer, self)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.guard_callback.on_before_optimizer_step(self.trainer, self, optimizer)
        self.count_unstepped_losses(keep=not self.guard_callback.step_skipped)
        if step_is_logged(self.trainer):  # the learning rates on the steps Lightning writes
            logs = {f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
            self.log_dict(logs, on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.guard_callback.on_save_checkpoint(self._trainer, self, checkpoint)

    def teardown(self, stage: str) -> None:
        self.guard_callback.teardown(self._trainer, self, stage)

    # ---------------------------------------------------------------- steps
    def _pipeline_step(self) -> Callable[..., tuple[Tensor, Any]] | None:
        """The strategy's pipeline step under ``trainer=pipeline`` (the model is split over ranks), else None."""
        return getattr(self._trainer.strategy, "pipeline_step", None) if self._trainer is not None else None

    def _step(self, batch: Any, stage: str, metrics: MetricCollection | None) -> Tensor:
        x, y = split_batch(batch)
        n = len(y)
        log_step = stage == "train" and step_is_logged(self._trainer, epoch_end=True)
        pipeline_step = self._pipeline_step()
        if pipeline_step is not None:  # forward and backward ran in the schedule; the output is on the last stage
            loss, out = pipeline_step(x, y, train=stage == "train")  # a leaf: its backward hands the gradients over
        else:
            out = self.model(x)
            loss = self.loss_fn(out, y)
            loss = routing_terms(self, loss, stage, n, log_step)
        if stage == "train":
            self.unstepped_losses.append((loss.detach(), n))
        else:
            self.epoch_means[f"{stage}_loss"].update(loss, n)
        if log_step:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        if metrics is not None and out is not None:
            metrics.update(out.detach(), y)
        return loss

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        clip = getattr(self._trainer.strategy, "clip_grad_norm_", None) if self._trainer is not None else None
        algorithm = getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm) or "norm"  # an enum in Lightning
        if clip is not None and gradient_clip_val and algorithm == "norm":
            clip(float(gradient_clip_val))  # the norm over every stage of the pipeline, not this rank's alone
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # A fresh start each epoch (Lightning resets what it logged, but a sanity check or an
    # interrupted epoch may leave state); one self.log per value at the end.
    def count_unstepped_losses(self, keep: bool = True) -> None:
        """Add the training losses since the last optimizer step to the epoch mean (``keep``), or drop them."""
        if keep:
            for loss, n in self.unstepped_losses:
                self.epoch_means["train_loss"].update(loss, n)
        self.unstepped_losses = []

    def on_train_epoch_start(self) -> None:
        reset_epoch(self.epoch_means, "train", self.train_metrics)
        self.unstepped_losses = []

    def on_validation_epoch_start(self) -> None:
        reset_epoch(self.epoch_means, "val", self.val_metrics)

    def on_test_epoch_start(self) -> None:
        reset_epoch(self.epoch_means, "test", self.test_metrics)

    def on_train_epoch_end(self) -> None:
        self.count_unstepped_losses()  # a step Lightning never took (an optimizer the user steps by hand)
        log_epoch(self, self.epoch_means, "train", self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        log_epoch(self, self.epoch_means, "val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        log_epoch(self, self.epoch_means, "test", self.test_metrics)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train", self.train_metrics)

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test", self.test_metrics)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        if self._pipeline_step() is not None:
            raise NotImplementedError(
                "predict under trainer=pipeline: this rank holds one stage of the model; load the checkpoint (it holds "
                "every stage) into a single-process CompositeModule and predict with trainer=cpu (or gpu)"
            )
        x = batch[0] if isinstance(batch, (tuple, list)) else batch  # (input, target) or input only
        return self.model(x)


def guard_callback(guard: Any, package: str | None) -> GradientGuardCallbackBase:
    """The module's guard callback from its ``guard`` argument: a mode, a mapping of arguments, or a callback.

    A mode or a mapping gets the ``GradientGuardCallback`` of ``package`` (the module's own).

    >>> guard_callback({"mode": "warn", "non_finite_patience": 2}, "pytorch_lightning").policy.patience
    2
    >>> guard_callback(["warn"], None)
    Traceback (most recent call last):
      ...
    TypeError: guard=['warn']: use a mode (raise, warn, off), a mapping of GradientGuardCallback arguments, or a GradientGuardCallback
    """
    if isinstance(guard, GradientGuardCallbackBase):
        return guard
    cls = composites_classes(package).GradientGuardCallback if package is not None else GradientGuardCallbackBase
    if isinstance(guard, Mapping):
        return cls(**guard)
    if isinstance(guard, (str, GuardMode)):
        return cls(guard)
    raise TypeError(
        f"guard={guard!r}: use a mode (raise, warn, off), a mapping of GradientGuardCallback arguments, "
        "or a GradientGuardCallback"
    )
