"""Section guard: the same train step with ``guard.check()`` after backward, against none; and what the
per-step capture of the random state and buffers (for the replay that names a cause) adds to a small step."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from benchmarks import SIZES, Row, Settings, compared, interleave, parallel_pair, sequential_pair, train_step
from composites import GradientGuard, Sequential
from composites.guard.forward_state import StateCapture

PAIRS = {"Sequential": sequential_pair, "Parallel": parallel_pair}
GUARD_TARGET = {"small": 1.10, "medium": 1.02}
STRUCTURAL_TARGET = {"small": 1.02}
CAPTURE_TARGET = 1.05  # one capture with buffers: under 5% of a small step


def run(s: Settings) -> list[Row]:
    """The check's rows for every size and composite, then the state capture's."""
    return check_rows(s) + capture_rows(s)


def check_rows(s: Settings) -> list[Row]:
    """The same train step with ``guard.check()`` after backward, against none.

    Separate copies of one model, so the guard's hooks (forward pre-hooks, a tensor hook per
    parameter) sit only on the guarded copies. "hooks only"
    builds a guard and never calls check(): it splits the hooks' cost from the check's.
    """
    rows = []
    for size in SIZES:
        for kind, pair in PAIRS.items():
            torch.manual_seed(0)
            model, _, x, y = pair(size)
            full, structural, hooked = (copy.deepcopy(model) for _ in range(3))
            hooks_guard = GradientGuard(hooked)  # never checked: its bookkeeping is bounded
            cases = {
                "none": train_step(model, x, y),
                "full": train_step(full, x, y, GradientGuard(full).check),
                "structural": train_step(structural, x, y, GradientGuard(structural, check_finite=False).check),
                "hooks only": train_step(hooked, x, y),
            }
            t = interleave(cases, s.scaled(1.5))
            del hooks_guard  # alive until here: the model's hooks hold their guard only weakly
            name = f"{kind} {size}: "
            rows.append(compared("guard", name + "check (finite on) / none", t, "full", "none", GUARD_TARGET[size]))
            rows.append(
                compared(
                    "guard", name + "check (structural) / none", t, "structural", "none", STRUCTURAL_TARGET.get(size)
                )
            )
            rows.append(compared("guard", name + "hooks only, no check() / none", t, "hooks only", "none"))
    return rows


def _then(step: Callable[[], None], extra: Callable[[], object]) -> Callable[[], None]:
    def both() -> None:
        step()
        extra()

    return both


def capture_rows(s: Settings) -> list[Row]:
    """A small train step (8 Linear + BatchNorm stages) with one state capture added, against the step alone.

    The guard captures the random state at each recorded forward and, once a step, copies the
    buffers (BatchNorm statistics) into storage kept from step to step: "with buffers" is what
    a step pays once, "random state only" what each further forward of the step pays. Each case
    steps its own copy of the model; the A/A row steps a copy against the original.
    """
    torch.manual_seed(0)
    model = Sequential({f"s{i}": nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64)) for i in range(8)})
    x, y = torch.randn(32, 64), torch.randn(32, 64)
    with_buffers, rng_only, aa = (copy.deepcopy(model) for _ in range(3))
    capture, rng_capture = StateCapture(with_buffers), StateCapture(rng_only)
    cases = {
        "step": train_step(model, x, y),
        "step copy": train_step(aa, x, y),  # A/A
        "with buffers": _then(train_step(with_buffers, x, y), lambda: capture(True)),
        "random state only": _then(train_step(rng_only, x, y), lambda: rng_capture(False)),
    }
    t = interleave(cases, s)
    name = "state capture, small step: "
    return [
        compared("guard", name + "step + one capture with buffers / step", t, "with buffers", "step", CAPTURE_TARGET),
        compared("guard", name + "step + one capture, random state only / step", t, "random state only", "step"),
        compared(
            "guard",
            name + "step copy / step (A/A)",
            t,
            "step copy",
            "step",
            note="the noise floor: any ratio this far from 1 is not a difference",
        ),
    ]
