"""Names a package exports but imports on first use: Lightning and matplotlib are slow to import."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` that imports ``names[name]`` (a module under ``package``) on first use.

    Example:
        >>> getattr_ = lazy_getattr("composites", {"MLP": "presets.models"})
        >>> getattr_("MLP").__name__
        'MLP'
        >>> getattr_("nope")
        Traceback (most recent call last):
          ...
        AttributeError: module 'composites' has no attribute 'nope'
    """

    def __getattr__(name: str) -> Any:
        if name in names:
            return getattr(importlib.import_module(f".{names[name]}", package), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    return __getattr__
