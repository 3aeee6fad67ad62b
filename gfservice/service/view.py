"""The read model: what readers (the exporter, ``status``, the client, reports) see of the aggregator.

A frozen :class:`AggregatorView` of every run (:class:`RunView`), taken at one moment: nothing a reader holds
changes under it, and nothing it does waits for a detector. :class:`ViewSource` is all a reader needs of the
service: ``observability/`` depends on this module, never on the aggregator itself.

>>> from gfservice.service.aggregator import Aggregator
>>> source: ViewSource = Aggregator()
>>> source.view().runs
()
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from gfservice.api import DetectorConfig, Finding, StepStats

__all__ = ["AggregatorView", "RunView", "ViewSource"]


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
    #: Detectors switched off for this run (past their error or time budget): name -> "errors" or "time".
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
            "finished": self.finished, "sender_dropped": self.sender_dropped, "attempt": self.attempt,
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
