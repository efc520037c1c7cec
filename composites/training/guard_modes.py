"""The guard's modes: the one list, read by the Lightning callback and by the Hydra schema.

A leaf module (nothing of Lightning or torchmetrics), so a config check that only needs the list
(``guard=rase`` at compose time) does not pay for importing the Lightning side.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

GUARD_MODES = ("raise", "warn", "off")
GuardMode = Enum("GuardMode", [(m, m) for m in GUARD_MODES], type=str)  # the one list; the Hydra schema uses it
GuardMode.__doc__ = "The guard's modes: ``raise`` (stop at the first bad backward), ``warn``, ``off``."


def guard_mode(mode: Any) -> str:
    """``mode`` (a string or a :data:`GuardMode`) as a plain string; a clear error for anything else.

    >>> guard_mode(GuardMode["warn"]), guard_mode("off")
    ('warn', 'off')
    """
    mode = str(getattr(mode, "value", mode))
    if mode not in GUARD_MODES:
        raise ValueError(f"guard='{mode}' is not one of {', '.join(GUARD_MODES)}")
    return mode
