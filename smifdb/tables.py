"""Aligned text tables for the CLI (`smifdb status`, `smifdb audit`): no SQL, only layout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from smifdb.progress import _duration

Column = tuple[str, Callable[[dict], Any]]


def seconds(value: float | None) -> str | None:
    """A duration as 4s, 2m05s, 1h03m (None stays empty)."""
    return None if value is None else _duration(value)


def timestamp(value: datetime | None) -> str | None:
    """Local time to the millisecond: events of one job are often milliseconds apart."""
    return None if value is None else value.astimezone().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """Rows under a header, one column per (title, getter); numbers right-aligned, None as -."""
    values = [[get(row) for _, get in columns] for row in rows]
    numeric = []
    for i in range(len(columns)):
        present = [v[i] for v in values if v[i] is not None]
        numeric.append(bool(present) and all(isinstance(v, int | float) for v in present))
    cells = [[_cell(v) for v in row] for row in values]
    widths = [
        max([len(title)] + [len(row[i]) for row in cells]) for i, (title, _) in enumerate(columns)
    ]

    def line(texts: list[str]) -> str:
        parts = [
            t.rjust(w) if right else t.ljust(w)
            for t, w, right in zip(texts, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line([title for title, _ in columns]), *(line(row) for row in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return str(value)
