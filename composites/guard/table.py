"""Plain-text tables: the one formatter behind the guard's report, the gradient-flow table and the test metrics."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, each as wide as its widest cell; no trailing spaces.

    It lives with the guard (the lowest layer that prints a table) so that the guard, the views
    and the scripts share it without an import cycle; ``composites.views`` exports it too.

    Example:
        >>> print(text_table(("test metric", "value"), [("test/acc", "0.9833"), ("test/loss", "0.0612")]))
        test metric  value
        test/acc     0.9833
        test/loss    0.0612
    """
    table = [tuple(header)] + [tuple(r) for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table)
