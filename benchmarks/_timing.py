"""Timing for the benchmarks: interleaved rounds in one process, reported as paired ratios.

Absolute times on a shared 2-core machine drift by tens of percent between runs, but two
cases timed back to back within a round see the same machine state. So every case runs
once per round (in a fresh random order, so no case always follows another) and a ratio is
the median over rounds of the per-round ratio, not a ratio of two independent medians.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# CPU time of this process, not wall time: the machine is shared (2 cores, other jobs), and
# with torch.set_num_threads(1) every op runs on the calling thread, so CPU time is the
# step's cost without the time spent descheduled. ``wall_clock()`` switches to wall time.
clock: Callable[[], float] = time.process_time


def now() -> float:
    """Seconds on the clock the benchmarks use now (process CPU time unless inside ``wall_clock()``)."""
    return clock()


@contextmanager
def wall_clock() -> Iterator[None]:
    """Time with the wall clock inside this block: GPU work, or a whole run (``--wall-clock``)."""
    global clock
    saved, clock = clock, time.perf_counter
    try:
        yield
    finally:
        clock = saved


@dataclass
class Timings:
    """Seconds per call of each case, one entry per round."""

    rounds: dict[str, list[float]]

    def median(self, case: str) -> float:
        return statistics.median(self.rounds[case])

    def ratio(self, case: str, base: str) -> tuple[float, float, float]:
        """Median, 25th and 75th percentile of the per-round ratio case/base."""
        paired = sorted(c / b for c, b in zip(self.rounds[case], self.rounds[base]))
        if len(paired) < 2:
            return paired[0], paired[0], paired[0]
        q1, q2, q3 = statistics.quantiles(paired, n=4)
        return q2, q1, q3

    def best_ratio(self, case: str, base: str) -> float:
        """Fastest block against fastest block: contention only ever adds time, so the minimum
        is the estimate least disturbed by other jobs (a cross-check on the median)."""
        return min(self.rounds[case]) / min(self.rounds[base])


def _reps_for(fn: Callable[[], object], block_s: float) -> tuple[int, float]:
    """Calls per timed block (so one block lasts about ``block_s``), and the seconds per call."""
    start = clock()
    fn()
    once = max(clock() - start, 1e-7)
    return max(1, round(block_s / once)), once


def interleave(cases: dict[str, Callable[[], object]], settings: Settings, warmup: int = 3, seed: int = 0) -> Timings:
    """Time every case once per round, in a shuffled order; each sample is one block's mean.

    Short blocks and many rounds pair the cases closely in time, which is what cancels a
    shared machine's drift. Rounds run until ``settings.budget_s`` is spent (within
    ``min_rounds``..``max_rounds``). The garbage collector is frozen (everything built so
    far moves to a permanent generation: a full collection of torch's objects takes ~0.3 s
    here) and off inside a round, so no case pays for another's garbage.
    """
    for fn in cases.values():
        for _ in range(warmup):  # allocator caches, lazy init, first-call dispatch
            fn()
    calibrated = {name: _reps_for(fn, settings.block_s) for name, fn in cases.items()}
    round_s = sum(n * once for n, once in calibrated.values())
    rounds = int(min(settings.max_rounds, max(settings.min_rounds, settings.budget_s / round_s)))
    samples: dict[str, list[float]] = {name: [] for name in cases}
    order, rng = list(cases), random.Random(seed)
    enabled = gc.isenabled()
    gc.collect()
    gc.freeze()
    try:
        for _ in range(rounds):
            rng.shuffle(order)
            gc.collect()  # cheap now: only what the last round left
            gc.disable()
            for name in order:
                fn, n = cases[name], calibrated[name][0]
                start = clock()
                for _ in range(n):
                    fn()
                samples[name].append((clock() - start) / n)
            if enabled:
                gc.enable()
    finally:
        gc.unfreeze()
        if enabled:
            gc.enable()
    return Timings(samples)


@dataclass
class Settings:
    """How hard to measure: ``--quick`` trades precision for a run of a few seconds."""

    quick: bool
    budget_s: float  # per comparison
    block_s: float
    min_rounds: int
    max_rounds: int

    @classmethod
    def make(cls, quick: bool) -> Settings:
        if quick:
            return cls(quick, budget_s=0.2, block_s=0.002, min_rounds=3, max_rounds=20)
        return cls(quick, budget_s=10.0, block_s=0.002, min_rounds=15, max_rounds=400)

    def scaled(self, factor: float) -> Settings:
        """The same settings with ``factor`` times the budget (for comparisons that need more)."""
        return dataclasses.replace(self, budget_s=self.budget_s * factor)


@dataclass
class Row:
    """One line of the table: ``case`` against ``base`` (a ratio), or a plain measured value."""

    section: str
    name: str
    ratio: float
    q1: float = float("nan")  # interquartile range of the per-round ratio: the noise
    q3: float = float("nan")
    best: float = float("nan")  # fastest block / fastest block
    target: float | None = None  # met when ratio <= target
    case_us: float = float("nan")
    base_us: float = float("nan")
    rounds: int = 0
    note: str = ""

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.ratio <= self.target


def compared(
    section: str, name: str, t: Timings, case: str, base: str, target: float | None = None, note: str = ""
) -> Row:
    ratio, q1, q3 = t.ratio(case, base)
    return Row(
        section,
        name,
        ratio,
        q1,
        q3,
        t.best_ratio(case, base),
        target,
        t.median(case) * 1e6,
        t.median(base) * 1e6,
        len(t.rounds[case]),
        note,
    )
