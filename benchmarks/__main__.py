"""``python -m benchmarks``: run the sections, print one table, write the results as JSON.

See ``benchmarks/__init__.py`` for what is measured and how a section registers.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import sys
import time

import torch

import benchmarks
from benchmarks import Row, Settings, load_section, section_names, wall_clock


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


def _checked(section: str, rows: list[Row]) -> list[Row]:
    """The rows of one section, each naming it: the JSON groups rows by that name."""
    wrong = sorted({r.section for r in rows} - {section})
    if wrong:
        raise ValueError(f"benchmarks/{section}.py returned rows of section(s) {wrong}: a Row names its own section")
    return rows


def main(argv: list[str] | None = None) -> dict:
    names = section_names()
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=benchmarks.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="few rounds, smaller models: a smoke run")
    parser.add_argument("--only", choices=names, action="append", help="run only this section (repeatable)")
    parser.add_argument("--out", default="bench.json", help="where to write the JSON results")
    parser.add_argument("--wall-clock", action="store_true", help="time with wall clock instead of process CPU time")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # comparable across machines; the ratios are about overhead, not parallelism
    settings = Settings.make(args.quick)
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    with wall_clock() if args.wall_clock else contextlib.nullcontext():
        for name in args.only or names:
            start = time.perf_counter()
            rows += _checked(name, load_section(name)(settings))
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
