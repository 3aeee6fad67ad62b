"""The saved state: what the service keeps across restarts (``Aggregator.state_dict``;
:mod:`gfservice.service.state` writes it as JSON), validated whole on load (:class:`SnapshotState`, with depth
and size limits), and the reasons the service forgets runs and disables detectors (label values of its metrics).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from gfservice.api import Finding
from gfservice.wire import MAX_STEP, MAX_WORLD_SIZE, AttemptId

__all__ = ["DETECTOR_STATE_MAX_DEPTH", "SNAPSHOT_MAX_DEPTH", "SNAPSHOT_MAX_ITEMS", "DisableReason", "EvictionReason",
           "RunState", "SnapshotState", "check_nesting"]



class EvictionReason(str, Enum):
    """Why the aggregator forgot a run (``AggregatorView.evicted``; the ``reason`` label of runs_evicted)."""

    finished_ttl = "finished_ttl"
    memory = "memory"
    max_runs = "max_runs"


class DisableReason(str, Enum):
    """Why a detector was disabled for a run (``RunView.disabled_detectors``)."""

    errors = "errors"
    time = "time"


#: Nesting a saved state may have (a detector's state included): far below what recursion allows.
SNAPSHOT_MAX_DEPTH = 100
#: Nesting a detector's saved state may use: the snapshot's depth less the levels around it (run, detectors...).
DETECTOR_STATE_MAX_DEPTH = SNAPSHOT_MAX_DEPTH - 8
#: Items (container entries) a saved state may hold in all; numpy arrays count as one.
SNAPSHOT_MAX_ITEMS = 100_000_000


def check_nesting(obj: Any, max_depth: int = SNAPSHOT_MAX_DEPTH, max_items: int = SNAPSHOT_MAX_ITEMS) -> None:
    """Raise ``ValueError`` when ``obj`` (plain data) nests deeper than ``max_depth`` or holds more than
    ``max_items`` items; walks without recursion, so that a hostile document cannot exhaust the stack.

    >>> deep: list = []
    >>> for _ in range(1000):
    ...     deep = [deep]
    >>> check_nesting({"a": [1, (2, {3})]})
    >>> check_nesting(deep)
    Traceback (most recent call last):
    ...
    ValueError: nested more than 100 levels deep
    """
    stack: list[tuple[Any, int]] = [(obj, 0)]
    items = 0
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children: Any = [*node.keys(), *node.values()]
        elif isinstance(node, list | tuple | set | frozenset):
            children = node
        else:
            continue
        if depth >= max_depth:
            raise ValueError(f"nested more than {max_depth} levels deep")
        items += len(children)
        if items > max_items:
            raise ValueError(f"more than {max_items} items")
        stack.extend((child, depth + 1) for child in children)


def _nesting_checked(value: Any) -> Any:
    try:
        check_nesting(value)
    except ValueError as exc:
        raise PydanticCustomError("snapshot_too_deep", "saved state {why}", {"why": str(exc)}) from None
    return value


class _Saved(BaseModel):
    # keys a later gfservice may add are ignored; numpy arrays ride in detector states
    model_config = ConfigDict(extra="ignore", arbitrary_types_allowed=True)


class RunState(_Saved):
    """One run as saved: detector states, findings, layouts and counters (not its step history)."""

    world_size: int = Field(ge=1, le=MAX_WORLD_SIZE)
    #: One entry per rank: a :class:`Layout` as plain data whose per-layer lists are in
    #: ``layout_tables[entry["table"]]`` (each distinct table stored once). Validated as a live layout on load.
    layouts: list[dict[str, Any]]
    layout_tables: list[dict[str, list[Any]]] = Field(default_factory=list)
    #: Detector name -> its ``state_dict()`` (disabled and unsaveable detectors left out).
    detectors: dict[str, dict[Any, Any]]
    #: The run's finding log, oldest first, and active findings old enough to have left it.
    log: list[Finding]
    active: list[Finding] = Field(default_factory=list)
    last_step: int = Field(ge=-1, lt=MAX_STEP)
    last_time: float
    #: (detector, severity, count) triples.
    findings_total: list[tuple[str, str, int]]
    stop_reason: str | None
    sender_dropped: int = Field(0, ge=0)
    finished: bool = False
    ended: list[int] = Field(default_factory=list)
    #: The run's live reconfigurations: (first step judged with it, detector -> fields set), oldest first.
    config_changes: list[tuple[int, dict[str, dict[str, Any]]]] = Field(default_factory=list)
    attempt: AttemptId = ""
    attempts: list[str] = Field(default_factory=list)
    attempt_count: int = 1
    rejected: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _tables_exist(self) -> RunState:
        for lay in self.layouts:
            table = lay.get("table")
            if table is not None and not (type(table) is int and 0 <= table < len(self.layout_tables)):
                raise ValueError(f"a layout names layer table {table!r} of {len(self.layout_tables)}")
        return self


class SnapshotState(_Saved):
    """The aggregator's whole saved state (``Aggregator.state_dict``), validated before anything is restored:
    a damaged or hostile one raises ``ValidationError`` (never ``RecursionError``), and nothing of it is taken.

    >>> SnapshotState.model_validate({"runs": {}, "accepted": 3}).accepted
    3
    >>> nested: dict = {}
    >>> for _ in range(500):
    ...     nested = {"x": nested}
    >>> SnapshotState.model_validate({"runs": {"r": {"detectors": {"d": nested}}}})
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for SnapshotState
      saved state nested more than 100 levels deep ...
    """

    runs: dict[str, RunState] = Field(default_factory=dict)
    accepted: int = Field(0, ge=0)
    rejected: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="wrap")
    @classmethod
    def _bounded(cls, value: Any, handler: Any) -> Any:
        if not isinstance(value, SnapshotState):
            _nesting_checked(value)
        return handler(value)
