"""The test suite: one folder per package of composites/ (and scripts/, benchmarks/)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
