"""A PNG of per-sub-model gradient norms over optimizer steps."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg  # headless: no pyplot, no display
from matplotlib.figure import Figure


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
        ax.plot(
            steps,
            ys,
            label=label,
            color=colours[i % 10],
            linestyle=styles[i // 10 % 4],
            marker=marker,
            markersize=3.5,
            linewidth=1.6,
        )
    bad = sorted(set(problem_steps))
    runs = [[s, s] for s in bad[:1]]
    for s in bad[1:]:  # consecutive steps shade as one band
        if s == runs[-1][1] + 1:
            runs[-1][1] = s
        else:
            runs.append([s, s])
    for k, (first, last) in enumerate(runs):
        ax.axvspan(
            first - 0.5,
            last + 0.5,
            color="#d6604d",
            alpha=0.15,
            linewidth=0,
            label=f"guard problem ({len(bad)} steps)" if k == 0 else None,
        )
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
