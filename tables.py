"""The one Markdown table formatter (console tables, benchmark and study reports, run reports).

On the ground floor with :mod:`errors`, so that every layer may import it.
"""
from __future__ import annotations

from typing import Iterable, Sequence

__all__ = ["markdown_table"]


def _escape(text: str) -> str:
    """A cell's text that cannot end the cell or the row: ``\\`` and ``|`` escaped, newlines as spaces."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[object]], *, aligned: bool = True) -> str:
    """A Markdown table of ``rows`` (cells through ``str``, escaped) under ``columns``: a header
    line, a ``---`` separator line and one line per row.  ``aligned`` pads every column to its
    widest cell (at least 3), so the table also reads as fixed-width text; otherwise cells are
    not padded.  A row with another number of cells than ``columns`` raises ValueError."""
    head = [_escape(str(c)) for c in columns]
    body = [[_escape(str(v)) for v in row] for row in rows]
    for i, row in enumerate(body):
        if len(row) != len(head):
            raise ValueError(f"table row {i} has {len(row)} cells for {len(head)} columns")
    widths = [max(3, len(c), *(len(r[i]) for r in body)) if aligned else 3 for i, c in enumerate(head)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) if aligned else c for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in body])
