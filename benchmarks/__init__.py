"""Does composites cost anything over hand-written PyTorch? The benchmark suite, one section per module.

Run it from the repository root (``make bench`` does)::

    python -m benchmarks                     # every section, a few minutes
    python -m benchmarks --quick             # smoke run: every section, few rounds
    python -m benchmarks --only guard --out guard.json

Every comparison runs both sides in one process, interleaved round by round, on CPU with one
thread, and reports the median of the per-round ratios with its interquartile range (the
noise); an A/A row (a case against a copy of itself) shows where the noise floor lies. This is
a tool for people, never a test: timings do not belong in a pass/fail suite.

How a section registers: drop a module into this folder. Every module here whose name does not
start with an underscore is a section, named after its file (``benchmarks/fsdp.py`` runs as
``--only fsdp``), and defines::

    def run(settings: Settings) -> list[Row]: ...

- Each ``Row`` names its section (``Row("fsdp", ...)``) and holds a finite ratio or measured
  value. A section that cannot run on this machine returns one row named ``"skipped: <why>"``
  with ratio ``nan`` instead, as ``gpu`` does without CUDA.
- A timing comparison runs its cases side by side with ``interleave`` and reports them with
  ``compared``; add an A/A row (a case against a copy of itself) where the noise is in doubt.
- With ``settings.quick`` a section finishes in seconds: ``tests/benchmarks`` runs every
  section that way.
- Sections are found without importing them (``section_names()``) and each is imported only
  when it runs, so a heavy import (Lightning, a distributed backend) at the top of one costs the
  others nothing. They run in ``ORDER``, then any other section by name.
- What sections share is exported here (timing, ``Row``, the composite/hand-written model
  pairs); a helper module that is not a section starts with an underscore.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

from benchmarks._models import (
    SIZES,
    moe_models,
    parallel_pair,
    sequential_pair,
    train_step,
)
from benchmarks._timing import Row, Settings, Timings, compared, interleave, now, wall_clock

__all__ = [
    "ORDER",
    "SIZES",
    "Row",
    "Settings",
    "Timings",
    "compared",
    "interleave",
    "load_section",
    "moe_models",
    "now",
    "parallel_pair",
    "section_names",
    "sequential_pair",
    "train_step",
    "wall_clock",
]

ORDER = (
    "composites",
    "guard",
    "diagnosis",
    "routing",
    "lightning",
    "fsdp",
    "expert_parallel",
    "pipeline",
    "compile",
    "gpu",
)  # the reading order of the table


def section_names() -> list[str]:
    """The sections in this folder, without importing them: ``ORDER`` first, then the rest by name.

    >>> section_names()[:3]
    ['composites', 'guard', 'diagnosis']
    """
    found = {m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg and not m.name.startswith("_")}
    return [name for name in ORDER if name in found] + sorted(found - set(ORDER))


def load_section(name: str) -> Callable[[Settings], list[Row]]:
    """The ``run`` function of section ``name``, imported now.

    >>> load_section("nope")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: no benchmark section 'nope': the sections are composites, guard, diagnosis, ...
    """
    names = section_names()
    if name not in names:
        raise ValueError(f"no benchmark section {name!r}: the sections are {', '.join(names)}")
    module = importlib.import_module(f"{__name__}.{name}")
    run = getattr(module, "run", None)
    if not callable(run):
        raise TypeError(f"benchmarks/{name}.py is a section but defines no run(settings) -> list[Row]")
    return run
