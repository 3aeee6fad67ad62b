"""Regenerate the committed dashboard JSON of this folder from gfservice's dashboards as code.

The dashboards themselves are built by :mod:`gfservice.observability.dashboards` (grafana-foundation-sdk
0.0.21, ``pip install -e '.[grafana]'``), so that an installed gfservice can write them too
(``gfservice dashboards render --out DIR``). This script is the checkout's entry point: after a change, run
from the repository root (``tests/test_dashboards.py`` fails when the JSON drifts)::

    python -m dashboards.build          # or: python dashboards/build.py [DIR]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from gfservice.cli import generated
from gfservice.observability.dashboards import (
    DASHBOARDS,
    DATASOURCE_UID,
    STALE_AFTER_S,
    UIDS,
    build,
    render,
    rendered_files,
    state_expr,
)

__all__ = ["DASHBOARDS", "DATASOURCE_UID", "HERE", "STALE_AFTER_S", "UIDS", "build", "main", "render", "state_expr",
           "write"]

#: This folder: where the committed JSON lives.
HERE = Path(__file__).resolve().parent


def write(directory: str | Path = HERE) -> list[Path]:
    """Build every dashboard from the code and write it as ``<key>.json`` into ``directory``."""
    return generated.write(directory, rendered_files(packaged=False))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    directory = Path(args[0]) if args else HERE
    for path in write(directory):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
