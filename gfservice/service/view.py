"""The read model: what readers (the exporter, ``status``, the client, reports) see of the aggregator.

A frozen :class:`AggregatorView` of every run (:class:`RunView`), taken at one moment: nothing a reader holds
changes under it, and nothing it does waits for a detector. :class:`ViewSource` is all a reader needs of the
service: ``observability/`` depends on this module, never on the aggregator itself.

The aggregator side: each run's :class:`Published` snapshot, replaced by :func:`publish` whenever the run
changes (cheap copies under the run's lock), and made into views only when a reader asks (:func:`take_view`).

>>> from gfservice.service.aggregator import Aggregator
>>> source: ViewSource = Aggregator()
>>> source.view().runs
()
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from gfservice.api import DetectorConfig, Finding, StepStats

if TYPE_CHECKING:
    from gfservice.service.findings import Record
    from gfservice.service.runs import Run, Table

__all__ = ["AggregatorView", "Published", "RunView", "ViewSource", "publish", "run_view", "take_view"]


@dataclass(frozen=True)
class RunView:
    """One run as it was when the view was taken."""

    name: str
    world_size: int
    layers: int
    last_step: int
    last_time: float
    finished: bool
    stop_reason: str | None
    sender_dropped: int
    #: Errors the run's monitors kept from their training loops (the sum of every rank's ``monitor.errors``).
    monitor_errors: int
    latest: StepStats | None
    findings_total: Mapping[tuple[str, str], int]
    #: Active findings, most severe first.
    active: tuple[Finding, ...]
    #: Findings that cleared at or after the view's ``since`` time, oldest first.
    recently_cleared: tuple[Finding, ...]
    detector_seconds: Mapping[str, float]
    detector_errors: Mapping[str, int]
    detector_configs: Mapping[str, DetectorConfig]
    #: The current attempt of the run (one start of its training job; "" when its senders do not tell).
    attempt: str = ""
    #: Attempts (starts) of the run so far: 1 for the first.
    attempts: int = 1
    #: Messages of this run refused, by :class:`~gfservice.wire.RejectReason` value.
    rejected: Mapping[str, int] = field(default_factory=dict)
    #: Detectors switched off for this run (past their error or time budget): name -> a DisableReason value
    #: ("errors" or "time").
    disabled_detectors: Mapping[str, str] = field(default_factory=dict)
    #: Bytes this run holds (history, pending steps, detector state), as accounted by the aggregator.
    memory_bytes: int = 0

    @property
    def stalled_ranks(self) -> int:
        """Ranks missing from the last merged step."""
        return len(self.latest.missing_ranks) if self.latest is not None else 0

    def row(self) -> dict[str, Any]:
        """The summary row of :meth:`Aggregator.runs`."""
        return {
            "run": self.name, "world_size": self.world_size, "layers": self.layers, "last_step": self.last_step,
            "last_time": self.last_time, "active_findings": len(self.active), "stop_reason": self.stop_reason,
            "finished": self.finished, "sender_dropped": self.sender_dropped,
            "monitor_errors": self.monitor_errors, "attempt": self.attempt,
            "attempts": self.attempts,
        }


@dataclass(frozen=True)
class AggregatorView:
    """A frozen, consistent picture of the aggregator: every run, and the service-wide counters."""

    runs: tuple[RunView, ...]
    accepted: int
    rejected: Mapping[str, int]
    ingest_seconds: float
    ingest_count: int
    layer_stats_merged: int
    #: Detector time and errors over all runs, forgotten runs included (so the totals never go down).
    detector_seconds: Mapping[str, float]
    detector_errors: Mapping[str, int]
    runs_forgotten: int
    taken: float
    #: Runs evicted or retired so far, by reason (e.g. "finished_ttl", "memory", "max_runs").
    evicted: Mapping[str, int] = field(default_factory=dict)
    #: Bytes held by all runs, and the budget (``AggregatorConfig.max_memory_bytes``; 0 when unbounded).
    memory_bytes: int = 0
    memory_limit_bytes: int = 0


class ViewSource(Protocol):
    """What a reader needs of the service: a frozen view, with findings cleared since ``since`` (a time of
    the service's clock) kept in each run's ``recently_cleared``."""

    def view(self, since: float | None = None) -> AggregatorView: ...


# ---- the aggregator side: what each run publishes, and views made of it -------------------------------------
class Published:
    """A run as readers see it: the fields of its :class:`RunView` and frozen copies of its finding records,
    made into a view (and :class:`Finding` copies) only when a reader asks: a step costs a few copies, not a
    view. Never changed once published, but for the view it caches."""

    __slots__ = ("_view", "active", "cleared", "fields")

    def __init__(self, fields: dict[str, Any], active: tuple[Record, ...], cleared: tuple[Record, ...]):
        self.fields = fields
        self.active = active
        #: Cleared records, oldest first (cleared records never change).
        self.cleared = cleared
        self._view: RunView | None = None

    @property
    def view(self) -> RunView:
        """The run's view without its findings (built once; two readers racing build the same one)."""
        if self._view is None:
            self._view = RunView(**self.fields, active=(), recently_cleared=())
        return self._view

    def run_view(self, since: float) -> RunView:
        cleared: list[Finding] = []
        for rec in reversed(self.cleared):  # newest first; cleared times only grow
            if rec.cleared_time is None or rec.cleared_time < since:
                break
            cleared.append(rec.copy())
        active = sorted((rec.copy() for rec in self.active), key=lambda f: -f.severity.rank)
        if not active and not cleared:
            return self.view
        return replace(self.view, active=tuple(active), recently_cleared=tuple(reversed(cleared)))


def publish(r: Run) -> None:
    """Replace what readers see of ``r`` (caller holds ``r.lock``): cheap copies, no findings built."""
    fields = dict(
        name=r.name, world_size=r.world_size, layers=len(r.layers), last_step=r.last_step,
        last_time=r.last_time, finished=r.finished, stop_reason=r.stop_reason, sender_dropped=r.sender_dropped,
        monitor_errors=sum(r.monitor_errors.values()),
        latest=r.history[-1] if r.history else None, findings_total=dict(r.findings_total),
        detector_seconds=dict(r.health.seconds), detector_errors=dict(r.health.errors),
        detector_configs={n: d.config for n, d in r.detectors.items()},
        attempt=r.attempt, attempts=r.attempt_count, rejected=dict(r.rejected),
        disabled_detectors={n: why.value for n, why in r.health.disabled.items()}, memory_bytes=r.memory.total,
    )
    r.published = Published(fields, tuple(copy.copy(rec) for rec in r.active.values()), tuple(r.cleared))


def take_view(table: Table, since: float | None = None) -> AggregatorView:
    """A frozen copy of every run and counter of ``table``; never waits for a run's detectors.

    ``since`` (a Unix time) bounds the cleared findings each run carries: those cleared at or after it.
    """
    with table.lock:
        now = table.clock()
        published = [r.published for r in table.runs.values()]
        seconds = dict(table.retired_seconds)
        errors = dict(table.retired_errors)
        counters = (table.accepted, dict(table.rejected), table.ingest_seconds, table.ingest_count,
                    table.layer_stats_merged, table.runs_forgotten)
        evicted, memory = dict(table.evicted), table.ledger.total
    cutoff = now if since is None else since
    runs = tuple(p.run_view(cutoff) for p in published if p is not None)
    for rv in runs:
        for d, v in rv.detector_seconds.items():
            seconds[d] = seconds.get(d, 0.0) + v
        for d, n in rv.detector_errors.items():
            errors[d] = errors.get(d, 0) + n
    accepted, rejected, ingest_seconds, ingest_count, merged, forgotten = counters
    return AggregatorView(
        runs=runs, accepted=accepted, rejected=rejected, ingest_seconds=ingest_seconds,
        ingest_count=ingest_count, layer_stats_merged=merged, detector_seconds=seconds, detector_errors=errors,
        runs_forgotten=forgotten, taken=now, evicted=evicted, memory_bytes=memory,
        memory_limit_bytes=table.config.max_memory_bytes,
    )


def run_view(table: Table, run: str, since: float | None = None) -> RunView:
    """One run's view; raises ``KeyError`` for an unknown run."""
    with table.lock:
        r = table.get(run)
        now = table.clock()
    if r.published is None:
        with r.lock:
            publish(r)
    assert r.published is not None
    return r.published.run_view(now if since is None else since)
