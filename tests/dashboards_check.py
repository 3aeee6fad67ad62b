"""Test support: the queries of a Grafana dashboard, its template variables filled in, to run them elsewhere.

No Grafana server runs in these tests, so the dashboards are checked by running every panel's PromQL against a
real Prometheus. :func:`panel_queries` gives those queries; :func:`expected_empty` says which panels may rightly
show nothing (their ``noValue`` text says why, e.g. "no alert firing").

>>> board = {"panels": [
...     {"type": "row", "title": "Status", "panels": []},
...     {"title": "Norm", "targets": [{"expr": 'gradflow_grad_norm{run="$run"}'}]},
...     {"title": "Rate", "fieldConfig": {"defaults": {"noValue": "nothing rejected"}},
...      "targets": [{"expr": "rate(gradflow_messages_rejected_total[$__rate_interval])"},
...                  {"expr": 'up{job="${job}"}', "hide": True}]}]}
>>> for title, expr in panel_queries(board, {"run": "exp-1", "job": "gfservice"}):
...     print(title, expr)
Norm gradflow_grad_norm{run="exp-1"}
Rate rate(gradflow_messages_rejected_total[1m])
Rate up{job="gfservice"}
>>> expected_empty(board)
{'Rate': 'nothing rejected'}
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from os import PathLike
from pathlib import Path
from typing import Any

from gfservice.observability.conventions import DATASOURCE_UID

#: Values of Grafana's global variables used when the caller does not give one.
BUILTINS: dict[str, str] = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "datasource": DATASOURCE_UID,
}

# ${name}, ${name:format}, [[name]], [[name:format]], $name (longest alternatives first).
_VARIABLE = re.compile(r"\$\{(?P<a>\w+)(?::(?P<af>\w+))?\}|\[\[(?P<b>\w+)(?::(?P<bf>\w+))?\]\]|\$(?P<c>\w+)")


def _load(dashboard: Mapping[str, Any] | str | PathLike[str]) -> Mapping[str, Any]:
    if isinstance(dashboard, Mapping):
        return dashboard
    text = str(dashboard)
    if text.lstrip().startswith("{"):
        return json.loads(text)
    return json.loads(Path(dashboard).read_text(encoding="utf-8"))


def _panels(board: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside (collapsed) rows


def substitute(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """Replace Grafana template variables in ``expr``; unknown ones raise ``KeyError`` naming the variable.

    ``variables`` maps names (with or without the ``$``) to values; Grafana's global variables
    (``$__rate_interval`` ...) default to :data:`BUILTINS`. The ``regex`` format escapes the value.

    >>> substitute('x{run=~"${run:regex}"}[$__interval]', {"$run": "a.b"})
    'x{run=~"a\\\\.b"}[15s]'
    """
    values = {**BUILTINS, **{k.lstrip("$"): str(v) for k, v in (variables or {}).items()}}

    def replace(m: re.Match[str]) -> str:
        name = m.group("a") or m.group("b") or m.group("c")
        fmt = m.group("af") or m.group("bf")
        if name not in values:
            raise KeyError(f"template variable ${name} in {expr!r} has no value; pass it in variables")
        value = values[name]
        return re.escape(value) if fmt == "regex" else value

    return _VARIABLE.sub(replace, expr)


def panel_queries(
    dashboard: Mapping[str, Any] | str | PathLike[str],
    variables: Mapping[str, str] | None = None,
    *,
    annotations: bool = False,
) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every panel target with an ``expr``, template variables substituted.

    ``dashboard`` is the dashboard's dict, its JSON text, or a path to its JSON file. Hidden targets are
    included (Grafana still runs them for transformations). With ``annotations=True`` the dashboard's
    Prometheus annotation queries come too, titled ``"annotation: <name>"``.
    """
    board = _load(dashboard)
    out: list[tuple[str, str]] = []
    for panel in _panels(board):
        for target in panel.get("targets", []) or []:
            expr = target.get("expr")
            if expr:
                out.append((panel.get("title", ""), substitute(expr, variables)))
    if annotations:
        for ann in (board.get("annotations") or {}).get("list", []):
            if ann.get("expr"):
                out.append((f"annotation: {ann.get('name', '')}", substitute(ann["expr"], variables)))
    return out


def expected_empty(dashboard: Mapping[str, Any] | str | PathLike[str]) -> dict[str, str]:
    """Panels that may rightly return no data, by title, with the ``noValue`` text that says why."""
    board = _load(dashboard)
    out: dict[str, str] = {}
    for panel in _panels(board):
        text = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("noValue")
        if text:
            out[panel.get("title", "")] = text
    return out
