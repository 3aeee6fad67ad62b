"""Wire-safe names: any model's parameter names (and any run name) as the wire takes them.

PyTorch takes any string as a parameter name; the wire does not (:class:`~gfservice.wire.Layout`: no control
characters or lone surrogates, at most ``max_layer_name`` characters, all distinct). A name the wire would
refuse is made safe, stably (the same on every rank and every restart) and readably: forbidden characters
are escaped (``\\x00``, ``\\ud800``), a long name is cut, and an altered name ends with ``#`` and a short hash
of the original so that two names never become one. Names the wire takes are left alone. The monitor keeps
the originals for display (:attr:`WireNames.original`).

>>> names = wire_layer_names(["fc.weight", "x\\ud800y", "z" * 300])
>>> names.wire[0], names.wire[1][:8], len(names.wire[2]), names.changed
('fc.weight', 'x\\\\ud800y', 256, 2)
>>> names.original[names.wire[1]] == "x\\ud800y"
True
>>> wire_run_name("my run/β 1"), wire_run_name("???")
('my-run-1', 'run')
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from typing import NamedTuple

from gfservice.wire import DEFAULT_LIMITS, forbidden_char

__all__ = ["WireNames", "safe_names", "wire_layer_name", "wire_layer_names", "wire_run_name"]

log = logging.getLogger("gfservice.training.monitoring")

#: Characters of the hash suffix an altered name ends with (``#`` and 10 hex digits).
_SUFFIX = 11
_RUN_BAD = re.compile(r"[^A-Za-z0-9_.:\-]+")


class WireNames(NamedTuple):
    """Layer names as sent (``wire``, in the order given), the original of each altered one, and how many
    were altered."""

    wire: list[str]
    original: dict[str, str]
    changed: int


def _escape(name: str) -> str:
    """``name`` with every character the wire refuses written as a Python escape (``\\x1b``, ``\\ud800``)."""
    if forbidden_char(name) is None:
        return name
    return "".join(ch if forbidden_char(ch) is None else ascii(ch)[1:-1] for ch in name)


def _digest(name: str) -> str:
    return hashlib.blake2s(name.encode("utf-8", "surrogatepass"), digest_size=5).hexdigest()


def wire_layer_name(name: str, limit: int = DEFAULT_LIMITS.max_layer_name) -> str:
    """``name`` as the wire takes it: itself when it can, else escaped and cut to ``limit`` characters with a
    hash of the original at the end.

    >>> wire_layer_name("a.b"), wire_layer_name("a\\tb"), wire_layer_name("")[:7]
    ('a.b', 'a\\\\tb#b147f03273', '<empty>')
    """
    if name and len(name) <= limit and forbidden_char(name) is None:
        return name
    body = _escape(name) or "<empty>"
    return body[: max(1, limit - _SUFFIX)] + "#" + _digest(name)


def wire_layer_names(names: Sequence[str], limit: int = DEFAULT_LIMITS.max_layer_name) -> WireNames:
    """Every name of ``names`` made wire-safe (:func:`wire_layer_name`), all distinct (a name that would
    repeat another gets a counter before its hash)."""
    wire: list[str] = []
    original: dict[str, str] = {}
    seen = set(names)  # names the wire takes as they are keep them: only altered ones may need to move aside
    taken: set[str] = set()
    changed = 0
    for name in names:
        safe = wire_layer_name(name, limit)
        if safe != name:
            changed += 1
            n = 1
            candidate = safe
            while candidate in taken or candidate in seen:
                n += 1
                cut = safe[: max(1, limit - _SUFFIX - len(str(n)) - 1)]
                candidate = f"{cut}~{n}#{_digest(name)}"
            safe = candidate
            original[safe] = name
        taken.add(safe)
        wire.append(safe)
    return WireNames(wire, original, changed)


def wire_run_name(text: str, fallback: str = "run") -> str:
    """``text`` as a run name the wire takes (letters, digits, ``_.:-``; at most 128 characters): other
    characters become ``-``; ``fallback`` when nothing is left."""
    return _RUN_BAD.sub("-", text.strip()).strip("-")[:128] or fallback


def safe_names(run: str, layers: Sequence[str]) -> tuple[str, list[str], dict[str, str]]:
    """What a monitor sends for ``run`` and its ``layers``: the run name and layer names made wire-safe, and the
    original of each altered layer name (for display); logs once what it changed.

    >>> run, layers, originals = safe_names("exp", ["a", "b\\x00"])
    >>> run, layers[0], layers[1][:5], originals[layers[1]] == "b\\x00"
    ('exp', 'a', 'b\\\\x00', True)
    """
    safe_run = wire_run_name(run)
    names = wire_layer_names(layers)
    if safe_run != run or names.changed:
        first = next(iter(names.original.items()), None)
        log.warning("gfservice: run %a is sent as %s; %d of %d layer names are escaped or cut to be sent%s (the "
                    "originals are kept in monitor.display_names)", run, safe_run, names.changed, len(layers),
                    f", e.g. {first[1]!a} as {first[0]!a}" if first else "")
    return safe_run, names.wire, names.original
