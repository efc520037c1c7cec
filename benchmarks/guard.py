"""Section guard: the same train step with ``guard.check()`` after backward, against none."""

from __future__ import annotations

import copy

import torch

from benchmarks import SIZES, Row, Settings, compared, interleave, parallel_pair, sequential_pair, train_step
from composites import GradientGuard

PAIRS = {"Sequential": sequential_pair, "Parallel": parallel_pair}
GUARD_TARGET = {"small": 1.10, "medium": 1.02}
STRUCTURAL_TARGET = {"small": 1.02}


def run(s: Settings) -> list[Row]:
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
