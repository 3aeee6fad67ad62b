"""Plain-text tables for the command line: columns padded to their widest cell, two spaces apart.

>>> print(table(("run", "step"), [("a", "12"), ("long-run", "3")]))
run       step
--------  ----
a         12
long-run  3
>>> print(table(("run", "step"), [("a", "12")], rule=False, max_width=2))
ru  st
a   12
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["table"]


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, rule: bool = True,
          max_width: int | None = None) -> str:
    """``header`` and ``rows`` as aligned lines (trailing spaces stripped); a dashed rule under the header
    unless ``rule=False``; cells longer than ``max_width`` are cut to it."""
    lines = [header, *rows]
    widths = [max(len(r[i]) for r in lines) for i in range(len(header))]
    if max_width is not None:
        widths = [min(w, max_width) for w in widths]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c[:w].ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(header)]
    if rule:
        out.append("  ".join("-" * w for w in widths))
    out += [line(r) for r in rows]
    return "\n".join(out)
