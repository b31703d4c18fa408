"""Plain-text tables for the terminal: every column as wide as its widest cell, a rule under the header."""

from __future__ import annotations

from collections.abc import Sequence


def text_table(rows: Sequence[Sequence[object]], left_aligned: int | None = None) -> str:
    """``rows`` (the header first) as aligned text: the first ``left_aligned`` columns left-aligned, the
    others right-aligned so that numbers line up by their last digit (None: every column left-aligned)."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    left = len(widths) if left_aligned is None else left_aligned
    lines = [
        "  ".join(
            cell.ljust(width) if i < left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
