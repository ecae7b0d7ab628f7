"""Plain-text tables for the terminal: one renderer and one way to print a value."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def cell(value: Any, fixed: bool = False) -> str:
    """`fixed`: every float with four decimals (the front's ratios), else compact for tiny or huge ones."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if fixed or 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "(none)"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns under a header and a rule; cells are already formatted."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows])


def key_values(values: dict[str, Any]) -> str:
    """One `key  value` line per set value, keys aligned."""
    width = max(map(len, values))
    return "\n".join(f"{k.ljust(width)}  {cell(v)}" for k, v in values.items() if v is not None)
