"""Plain-text tables whose columns are as wide as their widest value (headers included).

Every cell goes through :func:`printable`, so a file name with a newline or an escape
sequence cannot break the layout or drive the terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.text import printable


def pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None
) -> str:
    """Rows under headers, two spaces between columns. ``align`` has one letter per column,
    ``l`` or ``r`` (default: right for numbers, left for the rest, judged on the first row).
    The last column is not padded, so a long last value never adds trailing blanks."""
    headers = [printable(h) for h in headers]
    cells = [[printable("" if v is None else str(v)) for v in row] for row in rows]
    if align is None:
        first = rows[0] if rows else [""] * len(headers)
        align = "".join("r" if isinstance(v, int | float) else "l" for v in first)
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(values: Sequence[str]) -> str:
        parts = []
        for i, value in enumerate(values):
            last = i == len(values) - 1
            if align[i] == "r":
                parts.append(value.rjust(widths[i]))
            else:
                parts.append(value if last else value.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])
