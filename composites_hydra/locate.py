"""Where a config's ``_target_`` points: the object, or why it does not import and which names are near."""

from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Mapping
from typing import Any


def locate(target: str) -> tuple[Any, str | None]:
    """``(object, None)`` for an importable dotted name, else ``(None, why, with near names)``.

    >>> locate("torch.nn.Linaer")[1]
    "torch.nn has no 'Linaer'; did you mean torch.nn.Linear or torch.nn.Bilinear or torch.nn.LazyLinear?"
    >>> locate("composites.preset.models.MLP")[1]
    "composites has no 'preset'; did you mean composites.presets?"
    """
    parts = target.split(".")
    obj, index = None, 0
    for index in range(len(parts), 0, -1):  # the longest importable module prefix
        name = ".".join(parts[:index])
        try:
            obj = importlib.import_module(name)
            break
        except ModuleNotFoundError as error:
            if error.name is not None and not name.startswith(error.name):
                return None, f"importing {name} failed: {error}"  # the module exists; something it imports does not
        except Exception as error:  # the module exists but raised while importing
            return None, f"importing {name} failed: {type(error).__name__}: {error}"
    if obj is None:
        return None, f"no module named {parts[0]}"
    for position in range(index, len(parts)):
        part = parts[position]
        if not hasattr(obj, part):
            where = ".".join(parts[:position])
            last = position == len(parts) - 1  # a target is called: no module there
            names = {
                n for n in dir(obj) if not n.startswith("_") and not (last and inspect.ismodule(getattr(obj, n, None)))
            }
            if hasattr(obj, "__path__") and not last:
                names |= {m.name for m in pkgutil.iter_modules(obj.__path__)}
            near = near_names(part, sorted(names))
            return None, f"{where} has no '{part}'" + (
                f"; did you mean {' or '.join(f'{where}.{n}' for n in near)}?" if near else ""
            )
        obj = getattr(obj, part)
    return obj, None


def near_names(name: str, names: list[str]) -> list[str]:
    """Up to three of ``names`` close to ``name``: same letters in another case first, then by similarity.

    >>> near_names("Adamw", ["Adam", "AdamW", "SGD"])
    ['AdamW', 'Adam']
    """
    lower = {n.lower(): n for n in names}
    same = [n for n in names if n.lower() == name.lower()]
    close = [lower[n] for n in difflib.get_close_matches(name.lower(), list(lower), n=3, cutoff=0.6)]
    return list(dict.fromkeys(same + close))[:3]


def is_target_node(value: Any) -> bool:
    """Whether a config value is a node Hydra instantiates (a mapping with ``_target_``).

    >>> is_target_node({"_target_": "torch.nn.ReLU"}), is_target_node({"lr": 0.1})
    (True, False)
    """
    return isinstance(value, Mapping) and "_target_" in value
