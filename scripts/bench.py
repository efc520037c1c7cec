"""Does composites cost anything over hand-written PyTorch? Measured side by side, as ratios.

Every comparison runs both sides in this one process, interleaved round by round, on CPU
with one thread, and reports the median of the per-round ratios (with its interquartile
range, the noise). Absolute times are printed for orientation only. This is a script, never
a test: timings do not belong in a pass/fail suite.

    python scripts/bench.py                  # everything, ~ a few minutes
    python scripts/bench.py --quick          # smoke run: every section, few rounds
    python scripts/bench.py --only guard --out guard.json

Sections: composites (composite vs hand-written train step), guard (per-step check),
routing (per-sample top-1 vs dense and loop), lightning (one digits epoch vs a raw loop),
compile (torch.compile graph breaks and compiled/eager speed), gpu (CUDA only: Parallel on
streams vs serial, routing on the GPU with its host syncs counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench_* helpers sit beside this file

import bench_timing  # noqa: E402
import torch  # noqa: E402
from bench_timing import Row, Settings  # noqa: E402


def _section(module: str, function: str) -> Callable[[Settings], list[Row]]:
    """Imported only when run, so ``--only routing`` never pays for importing Lightning."""

    def run(settings: Settings) -> list[Row]:
        return getattr(__import__(module), function)(settings)

    return run


SECTIONS: dict[str, Callable[[Settings], list[Row]]] = {
    "composites": _section("bench_steps", "composites_vs_hand"),
    "guard": _section("bench_steps", "guard_overhead"),
    "routing": _section("bench_steps", "routing"),
    "lightning": _section("bench_lightning", "lightning_epoch"),
    "compile": _section("bench_compile", "compile_section"),
    "gpu": _section("bench_gpu", "gpu_section"),
}


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def print_table(rows: list[Row]) -> None:
    width = max((len(r.name) for r in rows), default=20)
    print(
        f"{'section':<11} {'comparison':<{width}} {'ratio':>7} {'IQR':>13} {'best':>6} {'target':>7} {'met':>4} "
        f"{'case us':>10} {'base us':>10} {'rounds':>6}  note"
    )
    for r in rows:
        met = {None: "", True: "yes", False: "NO"}[r.met]
        iqr = "" if math.isnan(r.q1) else f"{r.q1:.3f}-{r.q3:.3f}"
        target = "" if r.target is None else f"<={r.target:.2f}"
        print(
            f"{r.section:<11} {r.name:<{width}} {_fmt(r.ratio):>7} {iqr:>13} {_fmt(r.best):>6} {target:>7} {met:>4} "
            f"{_fmt(r.case_us, 1):>10} {_fmt(r.base_us, 1):>10} {r.rounds or '':>6}  {r.note}"
        )


def _json_safe(value: float) -> float | None:
    return None if isinstance(value, float) and math.isnan(value) else value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few rounds, smaller models: a smoke run")
    parser.add_argument("--only", choices=list(SECTIONS), action="append", help="run only this section (repeatable)")
    parser.add_argument("--out", default="bench.json", help="where to write the JSON results")
    parser.add_argument("--wall-clock", action="store_true", help="time with wall clock instead of process CPU time")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # comparable across machines; the ratios are about overhead, not parallelism
    if args.wall_clock:
        bench_timing.use_wall_clock()
    settings = Settings.make(args.quick)
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    for name in args.only or list(SECTIONS):
        start = time.perf_counter()
        rows += SECTIONS[name](settings)
        seconds[name] = round(time.perf_counter() - start, 2)
        print(f"[{name}: {seconds[name]:.1f} s]", file=sys.stderr)
    print_table(rows)

    result = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "settings": {**dataclasses.asdict(settings), "clock": "wall" if args.wall_clock else "process_cpu"},
        "section_seconds": seconds,
        "sections": {},
    }
    for r in rows:
        entry = {k: _json_safe(v) for k, v in dataclasses.asdict(r).items() if k != "section"}
        result["sections"].setdefault(r.section, []).append({**entry, "met": r.met})
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
