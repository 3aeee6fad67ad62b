"""Generated files (alert rules, dashboards, Kubernetes manifests): write them, or check them against the code.

Each generator in :mod:`gfservice.observability` gives its files as ``{path relative to a directory: text}``
(``rendered_files()``); this module writes them under a directory, or names those that are missing or differ
(what ``--check`` prints and the drift tests assert), for every ``gfservice ... render`` command alike.

>>> import pathlib, tempfile
>>> out = pathlib.Path(tempfile.mkdtemp())
>>> files = {"a/one.yml": "x: 1\\n", "two.json": "{}\\n"}
>>> drifted(out, files) == [out / "a/one.yml", out / "two.json"]
True
>>> [p.name for p in write(out, files)], drifted(out, files)
(['one.yml', 'two.json'], [])
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from os import PathLike
from pathlib import Path

__all__ = ["drifted", "render_or_check", "write"]

Files = Mapping[str, str] | Mapping[Path, str] | Mapping[str | Path, str]


def write(out: str | PathLike[str], files: Files) -> list[Path]:
    """Write every file under ``out`` (creating directories); returns the paths written."""
    written = []
    for rel, text in files.items():
        path = Path(out) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def drifted(out: str | PathLike[str], files: Files) -> list[Path]:
    """The paths under ``out`` that are missing or whose text differs from ``files``."""
    stale = []
    for rel, text in files.items():
        path = Path(out) / rel
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(path)
    return stale


def render_or_check(out: str | PathLike[str], files: Files, *, check: bool, fix: str) -> int:
    """The body of a ``render [--check]`` command; returns its exit status.

    Writes the files and prints their paths, or with ``check`` writes nothing and names each stale file on
    stderr with ``fix``, the command that regenerates it (exit 1 if any).
    """
    if check:
        stale = drifted(out, files)
        for path in stale:
            print(f"{path} is out of date or missing: run {fix}", file=sys.stderr)
        return 1 if stale else 0
    for path in write(out, files):
        print(path)
    return 0
