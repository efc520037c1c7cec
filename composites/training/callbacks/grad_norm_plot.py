"""Per-sub-model gradient norms over training: a Lightning callback that logs them and plots a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ...guard import submodel_grad_norms, submodel_names
from ..epoch_logging import step_is_logged
from ..packages import check_same_package
from .gradient_guard import active_guard
from .signal_checkpoint import StoppedAtOnce


def _trainable_submodels(pl_module: nn.Module) -> list[str]:
    model = getattr(pl_module, "model", None)
    model = model if isinstance(model, nn.Module) else pl_module
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return list(dict.fromkeys(owner or "(model)" for owner in submodel_names(model, names).values()))


class GradNormPlotBase:
    """Record each sub-model's gradient norm while training and save a PNG of it when ``fit`` ends.

    Every ``every_n_steps`` optimizer steps (default: the trainer's ``log_every_n_steps``, the
    cadence at which :class:`~composites.CompositeModule` logs ``grad_norm/<sub-model>``) it
    reads the norms before the optimizer steps. With a guard at work (a guarded ``CompositeModule``,
    or a :class:`GradientGuardCallback`) these are the very values the guard logs; without one the
    callback computes them (:func:`submodel_grad_norms` on ``pl_module.model``, or on the module
    itself) and logs them as ``grad_norm/<sub-model>`` to the configured logger(s). Steps at
    which the guard reported a problem (``guard="warn"``) are marked in the plot. The PNG is
    written on rank zero at the end of ``fit``, and also when ``fit`` stops on an exception
    (e.g. ``GradientFlowError``), so the run up to the failure can be seen.

    Args:
        filename: name of the PNG.
        dirpath: folder of the PNG; ``None`` is the trainer's ``default_root_dir`` (the run directory).
        every_n_steps: record every this many optimizer steps; ``None`` follows ``log_every_n_steps``.

    The callback is ``composites.training.GradNormPlot`` (``pytorch_lightning``) or
    ``composites.training.lightning.GradNormPlot``.

    Example:
        >>> from composites.training import GradNormPlot
        >>> callback = GradNormPlot(dirpath="outputs/run")
        >>> callback.history, callback.path
        ({}, None)
    """

    def __init__(
        self, filename: str = "grad_norms.png", dirpath: str | Path | None = None, every_n_steps: int | None = None
    ):
        self.filename = filename
        self.dirpath = dirpath
        self.every_n_steps = every_n_steps
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.problem_steps: list[int] = []
        self.path: Path | None = None  # where the PNG went, once written
        self._restored = False

    def state_dict(self) -> dict[str, Any]:
        """The history travels in checkpoints, so a resumed run's PNG shows every step."""
        return {"history": {k: list(v) for k, v in self.history.items()}, "problem_steps": list(self.problem_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: [tuple(point) for point in v] for k, v in state_dict["history"].items()}
        self.problem_steps = list(state_dict["problem_steps"])
        self._restored = True

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        check_same_package(self, trainer)

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not self._restored:  # a fresh fit starts a fresh plot; a resumed one goes on
            self.history = {}
            self.problem_steps = []
        self.path = None
        self._restored = False

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        step = trainer.global_step
        guard = active_guard(trainer, pl_module)
        report = guard.report if guard is not None else None  # the guard's last check
        if report is not None and not report.ok and step not in self.problem_steps[-1:]:
            self.problem_steps.append(step)
        if not step_is_logged(trainer, self.every_n_steps):
            return
        if report is not None:  # the guard logs these itself at log_every_n_steps
            norms = report.grad_norms()
        else:
            model = getattr(pl_module, "model", None)
            norms = submodel_grad_norms(model if isinstance(model, nn.Module) else pl_module)
            if norms:
                pl_module.log_dict({f"grad_norm/{k}": v for k, v in norms.items()}, on_step=True, on_epoch=False)
        for name in _trainable_submodels(pl_module):  # listed even when they never get a gradient
            self.history.setdefault(name, [])
        for name, norm in norms.items():
            self.history.setdefault(name, []).append((step, float(norm)))

    def _save(self, trainer: Any) -> None:
        if not trainer.is_global_zero:
            return
        from ...views import plot_grad_norms  # matplotlib: imported when a PNG is written, not with the callback

        folder = Path(self.dirpath) if self.dirpath is not None else Path(trainer.default_root_dir)
        self.path = plot_grad_norms(self.history, folder / self.filename, self.problem_steps)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._save(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # a Ctrl-C (also one that came while the plot was drawn) asks to stop now, not to draw
        if isinstance(exception, (KeyboardInterrupt, StoppedAtOnce)):
            return
        if self.history or self.problem_steps:
            self._save(trainer)
