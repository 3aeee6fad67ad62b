"""The aggregator's records: one :class:`Run` per run, and the :class:`Table` of runs with the service-wide
counters. Plain data and locks; the rooms beside this module (admission, merging, judging, findings,
reconfigure, snapshot, view) act on them, and :class:`~gfservice.service.aggregator.Aggregator` is their face.

Locks (the order never changes): a run's ``judging`` lock, then its ``lock``, then the table's ``lock``. Each
is held briefly but ``judging``, which orders the judging of the run's steps; no lock is held while a detector
runs but ``judging``, which no other run and no reader takes.

>>> table = Table(AggregatorConfig(), Lineup({}, dict))
>>> table.runs, table.accepted
({}, 0)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from gfservice.api import Detector, StepStats
from gfservice.config import AggregatorConfig
from gfservice.saved import DisableReason
from gfservice.service.memory import Layouts, Ledger, PendingSteps, RecordLog, RunMemory, StepHistory
from gfservice.stats import Array

if TYPE_CHECKING:
    from gfservice.service.findings import ErrorLog, Record
    from gfservice.service.view import Published

__all__ = ["ATTEMPTS_KEPT", "Health", "Lineup", "RankProgress", "Run", "Table", "log"]

#: The aggregator's log: every room writes to it (operators and tests filter on this one name).
log = logging.getLogger("gfservice.service.aggregator")

#: Attempts of a run remembered to tell a late message of an old attempt (stale_attempt) from a new one.
ATTEMPTS_KEPT = 64


@dataclass(eq=False)


class Health:
    """How a run's detectors fare: their time and errors, and which are disabled (see
    :mod:`gfservice.service.judging` and :mod:`gfservice.service.findings`)."""

    #: Seconds each detector spent on the run's steps, and its errors (timeouts included).
    seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    #: Detectors disabled for this run, and why.
    disabled: dict[str, DisableReason] = field(default_factory=dict)
    #: Errors of each enabled detector counted against its budget (since it was last enabled).
    strikes: dict[str, int] = field(default_factory=dict)
    #: Rate limit of each detector's error logs.
    error_log: dict[str, ErrorLog] = field(default_factory=dict)


@dataclass(eq=False)


class RankProgress:
    """The newest step each rank has reported, and what admission and merging ask of it, each answered without
    a scan of the ranks: the newest step of any rank, and whether every rank reached a step.

    >>> p = RankProgress()
    >>> for rank, step in ((0, 3), (1, 2), (0, 4), (2, 2)):
    ...     p.note(rank, step)
    >>> p.newest, p.last[0], p.all_reached(2, world_size=3), p.all_reached(3, world_size=3)
    (4, 4, True, False)
    >>> p.all_reached(2, world_size=4)    # rank 3 never reported
    False
    """

    #: The newest step of each rank that reported.
    last: dict[int, int] = field(default_factory=dict)
    #: The newest step of any rank (-1 before the first report).
    newest: int = -1
    #: How many ranks have each newest step (the values of ``last``, counted): its smallest key is the step of
    #: the rank furthest behind. Its size is the number of distinct newest steps, not the number of ranks.
    at: dict[int, int] = field(default_factory=dict)

    def note(self, rank: int, step: int) -> None:
        """Rank ``rank`` reported ``step`` (its newest step only moves forward)."""
        old = self.last.get(rank, -1)
        if step <= old:
            return
        if old >= 0:
            left = self.at[old] - 1
            if left:
                self.at[old] = left
            else:
                del self.at[old]
        self.at[step] = self.at.get(step, 0) + 1
        self.last[rank] = step
        self.newest = max(self.newest, step)

    def all_reached(self, step: int, world_size: int) -> bool:
        """Whether each of ``world_size`` ranks reported ``step`` or a later one (each rank reports in order,
        so no rank will send ``step`` any more unless it sent it already)."""
        return len(self.last) >= world_size and min(self.at, default=-1) >= step

    def clear(self) -> None:
        self.last.clear()
        self.at.clear()
        self.newest = -1


@dataclass(eq=False)


class Run:
    """Everything the aggregator knows of one run (private: readers get a :class:`~gfservice.service.view.RunView`).

    Made by :func:`gfservice.service.admission.new_run`, with containers that account their bytes in ``memory``.
    """

    name: str
    world_size: int
    detectors: dict[str, Detector]
    history: StepHistory
    log: RecordLog[Record]
    cleared: deque[Record]
    layouts: Layouts
    pending: PendingSteps
    #: Bytes the run holds, as accounted (see ``RunView.memory_bytes`` and :mod:`gfservice.service.memory`).
    memory: RunMemory
    layers: tuple[str, ...] = ()
    sharded: Array = field(default_factory=lambda: np.zeros(0, bool))
    units: Array | None = None
    #: When each waiting step's first report came (``Table.monotonic``: for the merge timeout only).
    pending_since: dict[int, float] = field(default_factory=dict)
    #: The ranks each waiting step's reports cover (a node merge agent's report covers several).
    pending_ranks: dict[int, set[int]] = field(default_factory=dict)
    active: dict[tuple[str, str], Record] = field(default_factory=dict)
    last_step: int = -1
    #: When the newest step was merged, as a Unix time (``Table.clock``): for display and /metrics only.
    last_time: float = 0.0
    #: When the run last sent anything it took (``Table.monotonic``): what idleness, eviction and the finish
    #: of a silent run are decided on.
    last_seen: float = 0.0
    findings_total: dict[tuple[str, str], int] = field(default_factory=dict)
    stop_reason: str | None = None
    #: Reports the run's senders dropped before they reached the service (queue full, service away).
    sender_dropped: int = 0
    #: The latest ``monitor_errors`` of each rank that reported some (cumulative counts of its monitor).
    monitor_errors: dict[int, int] = field(default_factory=dict)
    #: Set when the training job closed its monitors: the run is over, not stalled.
    finished: bool = False
    ended: set[int] = field(default_factory=set)
    #: The newest step each rank has reported.
    progress: RankProgress = field(default_factory=RankProgress)
    #: Detector configuration changes applied to the live run (:mod:`gfservice.service.reconfigure`), oldest
    #: first: (first step judged with it, detector name -> the fields set). Their count is the configuration version.
    config_changes: list[tuple[int, dict[str, dict[str, Any]]]] = field(default_factory=list)
    #: The current attempt (one start of the job's monitors; see :func:`gfservice.service.admission.new_attempt`).
    attempt: str = ""
    #: Attempts seen so far, the current one included (the newest ones: to tell late reports of old ones).
    attempts: deque[str] = field(default_factory=lambda: deque(maxlen=ATTEMPTS_KEPT))
    #: How many attempts the run has had (1 for the first).
    attempt_count: int = 1
    #: The previous attempt's layers until the current attempt's first layout with layers arrives (then its
    #: detectors keep their state when the layers are the same, else start fresh); None once decided.
    prior_layers: tuple[str, ...] | None = None
    #: Messages of this run refused, by reason.
    rejected: dict[str, int] = field(default_factory=dict)
    health: Health = field(default_factory=Health)
    #: Detector states of the last snapshot, reused when the run is busy judging at the next one.
    saved_detectors: dict[str, Any] = field(default_factory=dict)
    #: Detectors whose state could not be saved (logged once).
    unsaveable: set[str] = field(default_factory=set)
    #: Guards the run's state; never held while a detector runs.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Held while the run's steps are judged, so that they are judged one at a time, in order.
    judging: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: What readers see of the run, replaced whenever the run changes (:func:`gfservice.service.view.publish`).
    published: Published | None = None

    def begin_step(self, stats: StepStats, now: float) -> None:
        """Take a merged step into the history (caller holds ``lock``), before it is judged."""
        self.history.append(stats)
        self.last_step = stats.step
        self.last_time = now


@dataclass(frozen=True)


class Lineup:
    """The detectors every new run starts with: ``settings`` (detector -> fields, empty with a custom
    factory) and ``build``, which makes a fresh set; ``custom`` when ``build`` is not the registry's."""

    settings: Mapping[str, Mapping[str, Any]]
    build: Callable[[], dict[str, Detector]]
    custom: bool = False


@dataclass(eq=False)


class Table:
    """The run table and the service-wide counters. ``lock`` guards both; it is held briefly, never while a
    detector runs, and taken after a run's own locks, never before them."""

    config: AggregatorConfig
    lineup: Lineup
    #: Stamps merges and cleared findings (like :func:`time.time`): for display only, never for a decision.
    clock: Callable[[], float] = time.time
    #: Times every decision: merge timeouts, idleness, the finish of a silent run, time to live (like
    #: :func:`time.monotonic`; a step of the wall clock moves none of them).
    monotonic: Callable[[], float] = time.monotonic
    runs: dict[str, Run] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Bytes all runs hold (see :mod:`gfservice.service.memory`).
    ledger: Ledger = field(default_factory=Ledger)
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    layer_stats_merged: int = 0
    ingest_seconds: float = 0.0
    ingest_count: int = 0
    #: Detector time and errors of forgotten runs (the totals never go down).
    retired_seconds: dict[str, float] = field(default_factory=dict)
    retired_errors: dict[str, int] = field(default_factory=dict)
    runs_forgotten: int = 0
    #: Runs evicted or retired, by reason (an :class:`~gfservice.saved.EvictionReason` value).
    evicted: dict[str, int] = field(default_factory=dict)

    def get(self, run: str) -> Run:
        """The run named ``run`` (caller holds ``lock``); ``KeyError`` that names it when there is none."""
        try:
            return self.runs[run]
        except KeyError:
            raise KeyError(f"unknown run {run!r}") from None

    def get_locked(self, run: str) -> Run:
        with self.lock:
            return self.get(run)

    def count_ingest(self, t0: float) -> None:
        """Count one message taken or refused, begun at ``t0`` (``time.perf_counter``; caller holds ``lock``)."""
        self.ingest_seconds += time.perf_counter() - t0
        self.ingest_count += 1
