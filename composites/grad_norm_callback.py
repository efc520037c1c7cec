"""Per-sub-model gradient norms over training: a Lightning callback that logs them and plots a PNG."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg  # headless: no pyplot, no display
from matplotlib.figure import Figure
from torch import nn

from .structure import grouped_grad_norms, submodel_names


def submodel_grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norm of each sub-model's current gradient, named as the gradient guard names them.

    Parameters without a gradient are left out; a sub-model none of whose parameters has one
    is missing from the result. One host read.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from composites import Sequential
        >>> model = Sequential({"encoder": nn.Linear(3, 4), "head": nn.Linear(4, 2)})
        >>> model(torch.randn(5, 3)).sum().backward()
        >>> sorted(submodel_grad_norms(model))
        ['encoder', 'head']
    """
    named = list(model.named_parameters())
    return grouped_grad_norms(named, submodel_names(model, [n for n, _ in named]))


def _trainable_submodels(pl_module: nn.Module) -> list[str]:
    model = getattr(pl_module, "model", None)
    model = model if isinstance(model, nn.Module) else pl_module
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return list(dict.fromkeys(owner or "(model)" for owner in submodel_names(model, names).values()))


def plot_grad_norms(
    history: Mapping[str, Iterable[tuple[int, float]]],
    path: str | Path,
    problem_steps: Iterable[int] = (),
    title: str = "Gradient norm per sub-model",
) -> Path:
    """Write a PNG of gradient norms over optimizer steps, one line per sub-model.

    The y axis is logarithmic when every norm is positive; a sub-model with no gradient at a
    step (a routed-out branch) leaves a gap, one that never had one is marked in the legend. ``problem_steps`` are shaded red.

    Args:
        history: sub-model name -> ``(step, norm)`` pairs.
        path: the PNG to write (its folder is created).
        problem_steps: steps at which the gradient guard reported a problem.
        title: the heading.

    Returns:
        The path written.

    Example:
        >>> import tempfile
        >>> history = {"encoder": [(0, 1.0), (10, 0.5)], "head": [(0, 2.0), (10, 0.8)]}
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_grad_norms(history, f"{tmp}/grad_norms.png").stat().st_size > 0
        True
    """
    series = {name: sorted(points) for name, points in history.items()}
    steps = sorted({s for points in series.values() for s, _ in points})
    fig = Figure(figsize=(9.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = [v for points in series.values() for _, v in points if math.isfinite(v)]
    if values and min(values) > 0:
        ax.set_yscale("log")
    colours = [f"C{i}" for i in range(10)]
    styles = ["-", "--", ":", "-."]
    marker = "o" if len(steps) <= 30 else None
    for i, (name, points) in enumerate(series.items()):
        at = dict(points)
        ys = [at.get(s, math.nan) for s in steps]  # NaN: no gradient at that step, a gap
        label = name if any(math.isfinite(v) for v in ys) else f"{name} (no gradient at these steps)"
        ax.plot(steps, ys, label=label, color=colours[i % 10], linestyle=styles[i // 10 % 4], marker=marker,
                markersize=3.5, linewidth=1.6)
    bad = sorted(set(problem_steps))
    runs = [[s, s] for s in bad[:1]]
    for s in bad[1:]:  # consecutive steps shade as one band
        if s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    for k, (first, last) in enumerate(runs):
        ax.axvspan(first - 0.5, last + 0.5, color="#d6604d", alpha=0.15, linewidth=0,
                   label=f"guard problem ({len(bad)} steps)" if k == 0 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient L2 norm" + (" (log scale)" if ax.get_yscale() == "log" else ""))
    ax.set_title(title, fontsize=12, weight="bold")
    ax.grid(True, which="major", alpha=0.35)
    if not series:
        ax.text(0.5, 0.5, "no gradient norms were recorded", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8.5, frameon=False, title="sub-model")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130, facecolor="white")
    return out


class GradNormPlot(pl.Callback):
    """Record each sub-model's gradient norm while training and save a PNG of it when ``fit`` ends.

    Every ``every_n_steps`` optimizer steps (default: the trainer's ``log_every_n_steps``, the
    cadence at which :class:`~composites.CompositeModule` logs ``grad_norm/<sub-model>``) it
    reads the norms before the optimizer steps. With a guarded ``CompositeModule`` these are the
    very values the module logs; with any other ``LightningModule`` (or ``guard="off"``) the
    callback computes them (:func:`submodel_grad_norms` on ``pl_module.model``, or on the module
    itself) and logs them as ``grad_norm/<sub-model>`` to the configured logger(s). Steps at
    which the guard reported a problem (``guard="warn"``) are marked in the plot. The PNG is
    written on rank zero at the end of ``fit``, and also when ``fit`` stops on an exception
    (e.g. ``GradientFlowError``), so the run up to the failure can be seen.

    Args:
        filename: name of the PNG.
        dirpath: folder of the PNG; ``None`` is the trainer's ``default_root_dir`` (the run directory).
        every_n_steps: record every this many optimizer steps; ``None`` follows ``log_every_n_steps``.

    Example:
        >>> callback = GradNormPlot(dirpath="outputs/run")
        >>> callback.history, callback.path
        ({}, None)
    """

    def __init__(self, filename: str = "grad_norms.png", dirpath: str | Path | None = None, every_n_steps: int | None = None):
        self.filename, self.dirpath, self.every_n_steps = filename, dirpath, every_n_steps
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

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._restored:  # a fresh fit starts a fresh plot; a resumed one goes on
            self.history, self.problem_steps = {}, []
        self.path, self._restored = None, False

    def _due(self, trainer: pl.Trainer) -> bool:
        every = self.every_n_steps or trainer.log_every_n_steps
        return bool(trainer.fast_dev_run) or (every > 0 and (trainer.global_step + 1) % every == 0)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        report = getattr(pl_module, "report", None)  # CompositeModule: the guard's last check
        if report is not None and not report.ok and step not in self.problem_steps[-1:]:
            self.problem_steps.append(step)
        if not self._due(trainer):
            return
        guarded = report is not None and getattr(pl_module, "guard", None) is not None
        if guarded:  # the module logs these itself at log_every_n_steps
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

    def _save(self, trainer: pl.Trainer) -> None:
        if not trainer.is_global_zero:
            return
        folder = Path(self.dirpath) if self.dirpath is not None else Path(trainer.default_root_dir)
        self.path = plot_grad_norms(self.history, folder / self.filename, self.problem_steps)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.history or self.problem_steps:
            self._save(trainer)
