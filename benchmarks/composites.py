"""Section composites: a composite's train step against the hand-written module's.

Both sides hold deep copies of the same sub-modules (``benchmarks._models``), so they do the
same arithmetic and differ only in the glue; an A/A row (the hand-written module against a
copy of itself) shows the noise floor.
"""

from __future__ import annotations

import copy

import torch

from benchmarks import SIZES, Row, Settings, compared, interleave, parallel_pair, sequential_pair, train_step

PAIRS = {"Sequential": sequential_pair, "Parallel": parallel_pair}
GLUE_TARGET = {"small": 1.05, "medium": 1.02}


def run(s: Settings) -> list[Row]:
    """A composite's train step against the hand-written module's, with the A/A row."""
    rows = []
    for size in SIZES:
        for kind, pair in PAIRS.items():
            torch.manual_seed(0)
            composite, hand, x, y = pair(size)
            cases = {
                "composite": train_step(composite, x, y),
                "hand": train_step(hand, x, y),
                "hand copy": train_step(copy.deepcopy(hand), x, y),  # A/A: what "no difference" measures as
            }
            t = interleave(cases, s)
            rows.append(
                compared(
                    "composites", f"{kind} {size}: composite / hand-written", t, "composite", "hand", GLUE_TARGET[size]
                )
            )
            rows.append(
                compared(
                    "composites",
                    f"{kind} {size}: hand-written copy / hand-written (A/A)",
                    t,
                    "hand copy",
                    "hand",
                    note="the noise floor: any ratio this far from 1 is not a difference",
                )
            )
    return rows
