"""Plain-text tables and sizes for the CLI's output (and the HTML report's sizes)."""

from __future__ import annotations

import math


def format_table(rows: list[list], headers: list[str] | None = None) -> str:
    """Plain-text table with aligned columns; numbers are right-aligned."""
    cells = [[_cell(x) for x in r] for r in rows]
    if headers:
        cells.insert(0, list(headers))
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(map(len, cells)))]
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in rows if i < len(r))
               for i in range(len(widths))]
    lines = []
    for j, r in enumerate(cells):
        parts = [c.rjust(widths[i]) if numeric[i] and not (headers and j == 0) else c.ljust(widths[i])
                 for i, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
        if headers and j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return str(x)
        return f"{x:.4g}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.4f}".rstrip("0").rstrip(".")
    if isinstance(x, (list, tuple)):
        return ", ".join(map(str, x)) if x else "-"
    return str(x)


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB' (binary units)."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
