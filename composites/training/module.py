"""CompositeModule: train any composite with Lightning, one optimizer, a gradient guard each backward."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection

from ..guard import GradientFlowError, GradientGuard, GuardReport
from ..modules import Conditional
from .epoch_logging import epoch_means, log_epoch, reset_epoch, step_is_logged
from .param_groups import build_param_groups, plain
from .strategy import prepare_strategy

GUARD_MODES = ("raise", "warn", "off")


def _stage_metrics(metrics: Metric | MetricCollection | None, stage: str) -> MetricCollection | None:
    if metrics is None:
        return None
    collection = metrics if isinstance(metrics, MetricCollection) else MetricCollection([metrics])
    return collection.clone(prefix=f"{stage}/")  # a fresh copy per stage: train/val/test never share state


class CompositeModule(pl.LightningModule):
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
        guard: ``"raise"`` (default), ``"warn"`` or ``"off"``.
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
        >>> from composites import Sequential
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
    """

    def __init__(
        self,
        model: nn.Module,
        loss: nn.Module | Callable[[Any, Any], Tensor],
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        metrics: Metric | MetricCollection | None = None,
        param_groups: Sequence[Mapping[str, Any]] | None = None,
        guard: str = "raise",
        load_balancing: float = 0.0,
    ):
        super().__init__()
        guard = str(getattr(guard, "value", guard))  # a str-valued Enum (a validated config) works too
        if guard not in GUARD_MODES:
            raise ValueError(f"guard='{guard}' is not one of {', '.join(GUARD_MODES)}")
        param_groups = plain(param_groups) if param_groups is not None else None
        # Only plain values go into hparams: checkpoints are read with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["model", "loss", "optimizer", "scheduler", "metrics"])
        self.model = model
        self.loss_fn = loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.param_groups, self.guard_mode = param_groups, guard
        self.load_balancing = load_balancing
        self.gates = [m for m in model.modules() if isinstance(m, Conditional)] if load_balancing else []
        self.train_metrics = _stage_metrics(metrics, "train")
        self.val_metrics = _stage_metrics(metrics, "val")
        self.test_metrics = _stage_metrics(metrics, "test")
        self.capacity_gates = [
            m for m in model.modules() if isinstance(m, Conditional) and m.capacity_factor is not None
        ]
        # loss sums, logged once per epoch
        self.epoch_means = epoch_means(load_balancing=bool(self.gates), dropped=bool(self.capacity_gates))
        self.guard: GradientGuard | None = None
        self.report: GuardReport | None = None  # the last check's report
        self._warned: set[frozenset[tuple[str, str]]] = set()
        self._last_loss: Tensor | None = None

    def forward(self, x: Any) -> Any:
        return self.model(x)

    # ---------------------------------------------------------------- optimizer and guard
    def setup(self, stage: str) -> None:
        # Runs before the strategy wraps the model: DDP must learn about routed (Conditional)
        # branches now, and FSDP with the guard on is refused now rather than mid-training.
        if stage == "fit":
            chosen = prepare_strategy(self.trainer.strategy, self.model, guard_on=self.guard_mode != "off")
            if chosen:
                rank_zero_info(chosen)

    def configure_optimizers(self) -> Any:
        extra = (
            [(f"loss.{n}", p) for n, p in self.loss_fn.named_parameters()]
            if isinstance(self.loss_fn, nn.Module)
            else []
        )
        optimizer = self.optimizer_factory(build_param_groups(self.model, self.param_groups, extra))
        if self.guard is not None:  # configure_optimizers may run again (a second fit): one set of hooks
            self.guard.remove()
        self.guard = None
        if self.guard_mode != "off":
            trainer = self._trainer  # None when called outside a Trainer
            scaler = getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None
            # Given the optimizer, the guard reports any trainable parameter it does not hold.
            self.guard = GradientGuard(self.model, optimizer, scaler=scaler)
        if self.scheduler_factory is None:
            return optimizer
        factory = self.scheduler_factory
        if isinstance(factory, Mapping):  # a Lightning scheduler dict from YAML: {scheduler: <partial>, interval: step}
            if not callable(factory.get("scheduler")):
                raise TypeError(
                    "scheduler: a mapping needs a 'scheduler' entry that is a partial taking the optimizer "
                    "(_partial_: true), plus Lightning's keys (interval, frequency, monitor)"
                )
            return {"optimizer": optimizer, "lr_scheduler": {**factory, "scheduler": factory["scheduler"](optimizer)}}
        if not callable(factory):
            raise TypeError(
                f"scheduler must be a partial taking the optimizer (_partial_: true) or a Lightning "
                f"scheduler mapping, got {type(factory).__name__}"
            )
        scheduler = factory(optimizer)
        if isinstance(scheduler, Mapping):
            return {"optimizer": optimizer, "lr_scheduler": dict(scheduler)}
        config: dict[str, Any] = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = "val/loss"
        return {"optimizer": optimizer, "lr_scheduler": config}

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        # Automatic and manual optimization both come through here: keep the loss so the guard
        # can tell a GradScaler overflow (finite loss, inf gradients) from a real NaN.
        self._last_loss = loss.detach()
        super().backward(loss, *args, **kwargs)

    def on_after_backward(self) -> None:
        if self.guard is None:
            return
        self.report = self.guard.check(raise_error=self.guard_mode == "raise", loss=self._last_loss)
        if not self.report.ok:
            key = frozenset((p.parameter, p.cause) for p in self.report.problems)
            if key not in self._warned:
                self._warned.add(key)
                rank_zero_warn(
                    f"gradient guard (guard='warn', training goes on): {GradientFlowError(self.report.problems)}"
                )

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Only on steps Lightning writes: grad_norms() costs a device sync.
        if not step_is_logged(self.trainer):
            return
        logs = {f"lr/{g.get('name', i)}": float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
        if self.report is not None:  # grads now hold every micro-batch of this step
            logs.update({f"grad_norm/{name}": norm for name, norm in self.report.grad_norms().items()})
        self.log_dict(logs, on_step=True, on_epoch=False)

    def teardown(self, stage: str) -> None:
        if stage == "fit" and self.guard is not None:
            self.guard.remove()  # leave the model without hooks once training is over

    # ---------------------------------------------------------------- steps
    def _step(self, batch: Any, stage: str, metrics: MetricCollection | None) -> Tensor:
        x, y = batch
        out = self.model(x)
        loss = self.loss_fn(out, y)
        n = len(y)
        train = stage == "train"
        # Step values only when Lightning writes them, and on an epoch's last batch so the progress
        # bar and callback_metrics end the epoch on its final step.
        log_step = (
            train and self._trainer is not None and (step_is_logged(self._trainer) or self._trainer.is_last_batch)
        )
        if train and self.gates:
            balance = [g.load_balancing_loss() for g in self.gates if g.last_gate is not None]
            if balance:  # logged so a collapsing gate shows
                mean_balance = sum(balance) / len(balance)
                self.epoch_means["train_load_balancing"].update(mean_balance, n)
                if log_step:
                    self.log("train/load_balancing_step", mean_balance, on_step=True, on_epoch=False, batch_size=n)
                loss = loss + self.load_balancing * sum(balance)
        dropped = [g.dropped / max(1, g.last_gate[1].numel()) for g in self.capacity_gates if g.dropped is not None]
        if dropped:  # a device-side mean: no host read per step
            self.epoch_means[f"{stage}_dropped"].update(sum(dropped) / len(dropped), n)
        self.epoch_means[f"{stage}_loss"].update(loss, n)
        if log_step:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=n)
        if metrics is not None:
            metrics.update(out.detach(), y)
        return loss

    # A fresh start each epoch (Lightning resets what it logged, but a sanity check or an
    # interrupted epoch may leave state); one self.log per value at the end.
    def on_train_epoch_start(self) -> None:
        reset_epoch(self.epoch_means, "train", self.train_metrics)

    def on_validation_epoch_start(self) -> None:
        reset_epoch(self.epoch_means, "val", self.val_metrics)

    def on_test_epoch_start(self) -> None:
        reset_epoch(self.epoch_means, "test", self.test_metrics)

    def on_train_epoch_end(self) -> None:
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
        x = batch[0] if isinstance(batch, (tuple, list)) else batch  # (input, target) or input only
        return self.model(x)
