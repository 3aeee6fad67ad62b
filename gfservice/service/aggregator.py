"""The aggregator core (plain Python, no Ray, no torch): validate messages, merge ranks into steps, run
detectors, keep findings with their lifecycle and a bounded history per run.

Locks: one short global lock guards the run table and the service-wide counters; each run has its own lock for
its state (ingest, merge, findings) and a second one that orders the judging of its steps. Detectors never run
under a lock that another run or a reader needs: they run on worker threads, one call at a time per run, and
the caller waits for each call at most ``AggregatorConfig.detector_time_budget_s``. Readers (the exporter,
``status``, the client, reports) get a frozen :class:`AggregatorView` (:meth:`Aggregator.view`) built from
each run's published snapshot (replaced whenever the run changes), or copies of findings: nothing they hold
changes under them, and nothing they do waits for a detector.

Isolated detectors: a detector that raises or returns anything but ``None`` or a list of this run's
:class:`~gfservice.api.Finding` makes an error; one that takes longer than the time budget on a step, or makes
``detector_error_budget`` errors on a run, is disabled for that run and a ``detector_disabled`` finding (key:
the detector's name) says so; the step's other findings are always kept. ``gfservice configure RUN --set
NAME.enabled=true`` (or a restart of the service) re-enables it. A hung detector's thread is abandoned (one
thread per hung detector and run: it is never called again), and the run's later steps go on without it.

Admission checks that need the run (the stateless ones are :func:`~gfservice.wire.parse`'s): a step at most
``max_step_jump`` ahead of the run's newest step (``step_jump``; an attempt's first step may be anything), a
``RunEnd`` or report only from a rank that sent a layout (``unknown_rank``), a layout that agrees with the
other ranks' on layers, sharded flags, sizes, units and (for senders with attempt ids) world size
(``layout_mismatch``). Refusals are counted service-wide and on the run they name (``RunView.rejected``).

>>> from gfservice.wire import Layout, RunEnd, StepReport
>>> agg = Aggregator()
>>> agg.submit(Layout(run="r", rank=0, world_size=1, layers=["w"], numel=[4], sharded=[False]))
Ack(accepted=True, reason=None, new_findings=())
>>> ack = agg.submit({"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": {"count": [4],
...                   "sum_sq": [float("nan")], "max_abs": [float("nan")], "nonfinite": [4]}})
>>> [f.detector for f in ack.new_findings]
['nonfinite']
>>> agg.submit({"kind": "step", "run": "nope", "rank": 0, "step": 0}).reason
<RejectReason.unknown_run: 'unknown_run'>
>>> agg.view().rejected
{'unknown_run': 1}
>>> [(r.name, r.last_step, len(r.active)) for r in agg.view().runs]
[('r', 0, 1)]
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from gfservice import registry
from gfservice.api import Detector, Finding, Severity, StepStats
from gfservice.config import AggregatorConfig
from gfservice.registry import ConfigError
from gfservice.service.memory import (
    Layouts,
    Ledger,
    PendingSteps,
    RecordLog,
    RunMemory,
    Standing,
    StepHistory,
    victims,
)
from gfservice.service.state import encode
from gfservice.service.view import AggregatorView, RunView
from gfservice.stats import Array, merge_shards
from gfservice.wire import Layout, Rejected, RejectReason, RunEnd, StepReport, parse

__all__ = ["DETECTOR_DISABLED", "Ack", "Aggregator", "AggregatorConfig", "AggregatorView", "RunView"]

log = logging.getLogger(__name__)

#: Attempts of a run remembered to tell a late message of an old attempt (stale_attempt) from a new one.
_ATTEMPTS_KEPT = 64
#: The detector name of the finding that says a detector was disabled for a run (its key: that detector's name).
DETECTOR_DISABLED = "detector_disabled"
#: Seconds between the summary lines of a detector's repeated errors on one run (the first one logs in full).
_ERROR_LOG_INTERVAL_S = 60.0
#: Seconds a snapshot waits for a run busy judging a step before it keeps that run's previous detector states.
_SNAPSHOT_WAIT_S = 0.1


class Ack(NamedTuple):
    """Answer to one submitted message."""

    accepted: bool
    reason: RejectReason | None = None
    new_findings: tuple[Finding, ...] = ()


@dataclass(eq=False)
class _Record:
    """The aggregator's record of one finding: as first raised, and its lifecycle since."""

    raised: Finding
    first_step: int
    last_step: int
    severity: Severity
    value: float | None
    occurrences: int = 1
    active: bool = True
    cleared_time: float | None = None
    #: The run's detector configuration version when it was first raised (0: as started; see ``configure``).
    config: int = 0
    #: The attempt of the run in which it was first raised.
    attempt: str = ""

    @classmethod
    def new(cls, f: Finding, step: int, config: int = 0, attempt: str = "") -> _Record:
        return cls(f, step, step, f.severity, f.value, config=config, attempt=attempt)

    def seen(self, f: Finding, step: int) -> None:
        self.last_step = step
        self.value = f.value
        self.occurrences += 1
        if f.severity.rank > self.severity.rank:
            self.severity = f.severity

    def copy(self) -> Finding:
        """The finding as first raised, with its lifecycle filled in: an immutable copy for callers."""
        return self.raised.model_copy(update={
            "first_step": self.first_step, "last_step": self.last_step, "severity": self.severity,
            "value": self.value, "occurrences": self.occurrences, "active": self.active,
            "cleared_time": self.cleared_time, "config": self.config, "attempt": self.attempt,
        })

    def to_dict(self) -> dict[str, Any]:
        return self.copy().model_dump(mode="json")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> _Record:
        f = Finding.model_validate(d)
        raised = f.model_copy(update={"first_step": None, "last_step": None, "occurrences": 1, "active": True,
                                      "cleared_time": None, "config": 0, "attempt": ""})
        return cls(raised, f.since, f.last_step if f.last_step is not None else f.since, f.severity, f.value,
                   f.occurrences, f.active, f.cleared_time, f.config, f.attempt)


@dataclass(eq=False)
class _Run:
    """Everything the aggregator knows of one run (private: readers get a :class:`RunView`)."""

    name: str
    world_size: int
    detectors: dict[str, Detector]
    history: deque[StepStats]
    log: deque[_Record]
    cleared: deque[_Record]
    layouts: dict[int, Layout] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    sharded: Array = field(default_factory=lambda: np.zeros(0, bool))
    units: Array | None = None
    pending: dict[int, dict[int, StepReport]] = field(default_factory=dict)
    pending_since: dict[int, float] = field(default_factory=dict)
    active: dict[tuple[str, str], _Record] = field(default_factory=dict)
    last_step: int = -1
    last_time: float = 0.0
    findings_total: dict[tuple[str, str], int] = field(default_factory=dict)
    detector_errors: dict[str, int] = field(default_factory=dict)
    detector_seconds: dict[str, float] = field(default_factory=dict)
    stop_reason: str | None = None
    #: Reports the run's senders dropped before they reached the service (queue full, service away).
    sender_dropped: int = 0
    #: Set when the training job closed its monitors: the run is over, not stalled.
    finished: bool = False
    ended: set[int] = field(default_factory=set)
    #: The newest step each rank has reported.
    rank_last_step: dict[int, int] = field(default_factory=dict)
    #: Detector configuration changes applied to the live run (:meth:`Aggregator.configure`), oldest first:
    #: (first step judged with it, detector name -> the fields set). Their count is the configuration version.
    config_changes: list[tuple[int, dict[str, dict[str, Any]]]] = field(default_factory=list)
    #: The current attempt (one start of the job's monitors; see :meth:`Aggregator._new_attempt`).
    attempt: str = ""
    #: Attempts seen so far, the current one included (the newest ones: to tell late reports of old ones).
    attempts: deque[str] = field(default_factory=lambda: deque(maxlen=_ATTEMPTS_KEPT))
    #: How many attempts the run has had (1 for the first).
    attempt_count: int = 1
    #: The previous attempt's layers until the current attempt's first layout with layers arrives (then its
    #: detectors keep their state when the layers are the same, else start fresh); None once decided.
    prior_layers: tuple[str, ...] | None = None
    #: Messages of this run refused, by reason.
    rejected: dict[str, int] = field(default_factory=dict)
    #: Detectors disabled for this run: name -> "errors" or "time".
    disabled: dict[str, str] = field(default_factory=dict)
    #: Errors of each enabled detector counted against its budget (since it was last enabled).
    strikes: dict[str, int] = field(default_factory=dict)
    #: Rate limit of error logs: detector -> [start of the current window, errors not logged in it, last error].
    error_log: dict[str, list[Any]] = field(default_factory=dict)
    #: Detector states of the last snapshot, reused when the run is busy judging at the next one.
    saved_detectors: dict[str, Any] = field(default_factory=dict)
    #: Detectors whose state could not be saved (logged once).
    unsaveable: set[str] = field(default_factory=set)
    #: Bytes the run holds, as accounted (see ``RunView.memory_bytes`` and :mod:`gfservice.service.memory`).
    memory: RunMemory = field(default_factory=lambda: RunMemory(Ledger(), 0))
    #: Guards the run's state; never held while a detector runs.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: Held while the run's steps are judged, so that they are judged one at a time, in order.
    judging: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: What readers see of the run (see :class:`_Published`), replaced whenever the run changes.
    published: _Published | None = None


class _Published:
    """A run as readers see it: the fields of its :class:`RunView` and frozen copies of its finding records,
    made into a view (and :class:`Finding` copies) only when a reader asks: a step costs a few copies, not a
    view. Never changed once published, but for the view it caches."""

    __slots__ = ("_view", "active", "cleared", "fields")

    def __init__(self, fields: dict[str, Any], active: tuple[_Record, ...], cleared: tuple[_Record, ...]):
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


class _Outcome(NamedTuple):
    """What one detector call gave: findings (or None), or an error, or nothing in time."""

    name: str
    found: list[Finding] | None
    error: BaseException | None
    seconds: float
    timed_out: bool = False


def _call(name: str, det: Detector, stats: StepStats) -> _Outcome:
    """Call ``det`` on ``stats``; every failure, a bad return value included, is an error of the outcome."""
    t0 = time.perf_counter()
    try:
        found = det.update(stats)
        if found is not None:
            if not isinstance(found, list):
                raise TypeError(f"update returned {type(found).__name__}, not a list of Finding")
            for f in found:
                if not isinstance(f, Finding):
                    raise TypeError(f"update returned a list holding a {type(f).__name__}, not Finding")
                if f.run != stats.run:
                    raise ValueError(f"update returned a finding of run {f.run!r} for run {stats.run!r}")
        return _Outcome(name, found, None, time.perf_counter() - t0)
    except BaseException as exc:  # a plugin's SystemExit must not end a worker silently either
        return _Outcome(name, None, exc, time.perf_counter() - t0)


class _Job:
    """The detector calls of one step, made in order on a worker thread. The waiting caller abandons the job
    when a call runs past its time budget; the worker then drops whatever that call returns and stops."""

    def __init__(self, stats: StepStats, detectors: Sequence[tuple[str, Detector]]):
        self.stats = stats
        self.detectors = detectors
        self.cond = threading.Condition()
        self.outcomes: list[_Outcome] = []
        #: When the current call began (``time.perf_counter``); None between calls.
        self.started: float | None = None
        self.abandoned = False

    def run(self) -> None:
        for name, det in self.detectors:
            with self.cond:
                if self.abandoned:
                    return
                self.started = time.perf_counter()
                self.cond.notify_all()
            outcome = _call(name, det, self.stats)
            with self.cond:
                if self.abandoned:
                    return
                self.outcomes.append(outcome)
                self.started = None
                self.cond.notify_all()


class _Workers:
    """Daemon threads that run :class:`_Job` s, started on demand and stopped after a minute idle. A thread
    stuck in a hung detector is simply written off: it no longer counts, and a new thread takes the next job."""

    def __init__(self, idle_s: float = 60.0):
        self._idle_s = idle_s
        self.reset()

    def reset(self) -> None:
        """Forget every thread (a forked child has none of its parent's)."""
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        #: Threads waiting for a job, less the jobs queued for them.
        self._idle = 0

    def start(self, job: _Job) -> None:
        with self._lock:
            spawn = self._idle <= 0
            if not spawn:
                self._idle -= 1
        if spawn:
            try:
                threading.Thread(target=self._loop, name="gfservice-detectors", daemon=True).start()
            except RuntimeError:  # no thread to be had: run the job on the caller's thread
                job.run()
                return
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # more threads wait than there are jobs: this one may go
                        self._idle -= 1
                        return
                continue
            job.run()
            with self._lock:
                self._idle += 1


#: The detector threads of every aggregator of this process.
_WORKERS = _Workers()
os.register_at_fork(after_in_child=_WORKERS.reset)


class Aggregator:
    """Merges reports of many runs and ranks and runs the detectors; thread-safe.

    ``detector_settings`` maps detector names to field overrides (see :mod:`gfservice.registry`);
    ``detector_factory`` replaces the registry entirely (tests, embedding). ``clock`` (like
    :func:`time.time`) stamps merges and cleared findings. ``submit`` returns the findings its message
    raised, synchronously, whichever thread the detectors ran on.
    """

    def __init__(
        self,
        config: AggregatorConfig | None = None,
        detector_settings: Mapping[str, Mapping[str, Any]] | None = None,
        detector_factory: Callable[[], dict[str, Detector]] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.config = config or AggregatorConfig()
        settings = registry.validate(detector_settings)
        #: The detector settings every new run starts from (empty with a ``detector_factory``).
        self._detector_settings = {} if detector_factory else settings
        self._custom_factory = detector_factory is not None
        self._factory = detector_factory or (lambda: registry.build(settings))
        self._clock = clock
        self._runs: dict[str, _Run] = {}
        #: The run table and the service-wide counters; held briefly, never while a detector runs. Taken after
        #: a run's own locks, never before them.
        self._lock = threading.Lock()
        self._workers = _WORKERS
        self._accepted = 0
        self._rejected: dict[str, int] = {}
        self._layer_stats_merged = 0
        self._ingest_seconds = 0.0
        self._ingest_count = 0
        self._retired_seconds: dict[str, float] = {}
        self._retired_errors: dict[str, int] = {}
        self._runs_forgotten = 0
        #: Bytes all runs hold (see :mod:`gfservice.service.memory`), and runs evicted or retired by reason.
        self._ledger = Ledger()
        self._evicted: dict[str, int] = {}

    # ---- ingest ---------------------------------------------------------------------------------
    def submit(self, message: Layout | StepReport | RunEnd | Mapping[str, Any]) -> Ack:
        """Validate and take one message (a message object or a plain dict); never raises for bad input."""
        t0 = time.perf_counter()
        try:
            msg = parse(message, self.config)  # outside any lock: validation is the costly part
            new: list[Finding] = []
            if isinstance(msg, Layout):
                self._take_layout(msg)
            else:
                run = self._find(msg.run)
                with run.judging:  # waits only for this run's own detectors
                    with run.lock:
                        self._check_current(run)
                        if isinstance(msg, RunEnd):
                            steps = self._end(run, msg)
                            self._publish(run)
                        else:  # what readers see changes only with a merged step: published once judged
                            steps = self._ingest(run, msg)
                    new = self._judge_steps(run, steps)
            with self._lock:
                self._accepted += 1
                self._count_ingest(t0)
            self._enforce_memory()
            return Ack(True, None, tuple(new))
        except Rejected as exc:
            self._count_rejected(exc.reason, message, t0)
            log.debug("rejected message: %s", exc)
            return Ack(False, exc.reason)

    def _count_rejected(self, reason: RejectReason, message: Any, t0: float) -> None:
        """Count a refused message service-wide, and on its run when it names one the aggregator has."""
        try:  # a hostile object may lack the field, or raise when asked for it
            name = (message.run if isinstance(message, Layout | StepReport | RunEnd)
                    else dict.get(message, "run") if isinstance(message, dict) else None)  # nothing else is trusted
        except Exception:
            name = None
        with self._lock:
            self._rejected[reason.value] = self._rejected.get(reason.value, 0) + 1
            self._count_ingest(t0)
            run = self._runs.get(name) if type(name) is str else None
        if run is not None:
            with run.lock:
                run.rejected[reason.value] = run.rejected.get(reason.value, 0) + 1
                if run.published is not None:
                    self._publish(run)

    def _count_ingest(self, t0: float) -> None:
        self._ingest_seconds += time.perf_counter() - t0
        self._ingest_count += 1

    def _find(self, name: str) -> _Run:
        with self._lock:
            run = self._runs.get(name)
        if run is None:
            raise Rejected(RejectReason.unknown_run, f"no layout for run {name!r}; send the Layout first")
        return run

    def _check_current(self, run: _Run) -> None:
        """Raise ``unknown_run`` when ``run`` left the run table while the caller waited for its locks."""
        if self._runs.get(run.name) is not run:
            raise Rejected(RejectReason.unknown_run, f"run {run.name!r} was forgotten meanwhile")

    def _take_layout(self, lay: Layout) -> None:
        """Register ``lay`` holding the current run's locks (if any), then the global lock: a replaced or new
        run is built and published before anyone else can see it."""
        while True:
            with self._lock:
                run = self._runs.get(lay.run)
            with contextlib.ExitStack() as held:
                if run is not None:
                    held.enter_context(run.judging)
                    held.enter_context(run.lock)
                with self._lock:
                    if self._runs.get(lay.run) is not run:
                        continue  # replaced meanwhile: start over with the current one
                    target = self._register(lay)
                    if target is not run:
                        with target.lock:
                            self._publish(target)
                if run is not None and target is run:
                    self._publish(run)
                return

    def _register(self, lay: Layout) -> _Run:
        if len(lay.layers) > self.config.max_layers:
            raise Rejected(RejectReason.oversized, f"{len(lay.layers)} layers, limit {self.config.max_layers}")
        run = self._runs.get(lay.run)
        if run is not None and lay.attempt != run.attempt:
            self._check_attempt(run, lay)  # an older attempt raises stale_attempt
            self._new_attempt(run, lay)
        elif run is None or run.world_size != lay.world_size:
            if run is not None:
                if lay.attempt and any(r != lay.rank for r in run.layouts):
                    # senders that tell attempts apart start a new attempt to change the world size
                    raise Rejected(RejectReason.layout_mismatch,
                                   f"rank {lay.rank} of {lay.run} reports world size {lay.world_size}, "
                                   f"the run's other ranks {run.world_size}")
                log.info("run %s restarted with world size %d", lay.run, lay.world_size)
            run = self._new_run(lay.run, lay.world_size, lay.attempt)
        if lay.reports_layers:
            if run.layers and tuple(lay.layers) != run.layers:
                raise Rejected(RejectReason.layout_mismatch, f"rank {lay.rank} of {lay.run} reports other layers")
            _check_consistent(run, lay)
            if run.prior_layers is not None:
                if tuple(lay.layers) != run.prior_layers:  # another model: its detectors start afresh
                    log.info("run %s attempt %s reports other layers: fresh detectors", run.name, run.attempt)
                    run.detectors = {n: type(d)(d.config) for n, d in run.detectors.items()}
                run.prior_layers = None
            run.layers = tuple(lay.layers)
            run.sharded = np.asarray(lay.sharded, dtype=bool)
            run.units = np.asarray(lay.units, dtype=np.int64) if lay.units else None
        run.layouts[lay.rank] = lay
        run.ended.discard(lay.rank)
        run.finished = False
        return run

    @staticmethod
    def _check_attempt(run: _Run, msg: Layout | StepReport | RunEnd) -> None:
        """Raise ``stale_attempt`` for a message of an earlier attempt of ``run`` (caller checked it differs)."""
        if msg.attempt in run.attempts:
            raise Rejected(RejectReason.stale_attempt,
                           f"attempt {msg.attempt!r} of {msg.run} was followed by attempt {run.attempt!r}")

    def _new_attempt(self, run: _Run, lay: Layout) -> None:
        """Start attempt ``lay.attempt`` of ``run`` (a restarted job): step tracking starts over; findings,
        history and (for the same layers) detector state are kept. The previous attempt's waiting steps are
        dropped (merging them without the ranks that died would raise stalled-rank findings about processes that
        are gone), and its active findings clear: the new attempt's detectors raise again what still holds.
        """
        log.info("run %s: attempt %r follows attempt %r (restart)", run.name, lay.attempt, run.attempt)
        if run.pending:
            log.info("run %s: dropping %d unmerged steps of attempt %r", run.name, len(run.pending), run.attempt)
        run.attempt = lay.attempt
        run.attempts.append(lay.attempt)
        run.attempt_count += 1
        run.world_size = lay.world_size
        run.layouts.clear()
        run.pending.clear()
        run.pending_since.clear()
        run.rank_last_step.clear()
        run.ended.clear()
        run.last_step = -1
        run.finished = False
        run.prior_layers = run.layers if run.prior_layers is None else run.prior_layers
        run.layers = ()
        run.sharded = np.zeros(0, bool)
        run.units = None
        now = self._clock()
        for rec in run.active.values():
            rec.active = False
            rec.cleared_time = now
            run.cleared.append(rec)
        run.active.clear()

    def _new_run(self, name: str, world_size: int, attempt: str = "") -> _Run:
        """A fresh run ``name`` (caller holds ``self._lock``), replacing the one of that name. Past ``max_runs``,
        runs are evicted first, in the order of :func:`~gfservice.service.memory.eviction_order`."""
        old = self._runs.get(name)
        if old is not None:
            self._retire(old)
        excess = len(self._runs) + 1 - self.config.max_runs
        if excess > 0:  # a batch at a time (1/64 of the table): each choice weighs every run
            self._evict("max_runs", count=max(excess, self.config.max_runs // 64))
        detectors = self._factory()
        memory = RunMemory(self._ledger, len(detectors), created=self._clock())
        cap = self.config.findings_history
        run = _Run(name=name, world_size=world_size, detectors=detectors,
                   history=StepHistory(memory, self.config.history), log=RecordLog(memory, cap),
                   cleared=deque(maxlen=cap), layouts=Layouts(memory), pending=PendingSteps(memory),
                   attempt=attempt, memory=memory)
        run.attempts.append(attempt)
        self._runs[name] = run
        return run

    def _retire(self, run: _Run, reason: str | None = None) -> None:
        """Forget ``run``, keeping its detector time and errors in the service-wide totals; ``reason`` counts
        an eviction (``AggregatorView.evicted``)."""
        for d, v in dict(run.detector_seconds).items():  # copied: it may be judging
            self._retired_seconds[d] = self._retired_seconds.get(d, 0.0) + v
        for d, n in dict(run.detector_errors).items():  # copied: it may be judging
            self._retired_errors[d] = self._retired_errors.get(d, 0) + n
        del self._runs[run.name]
        run.memory.detach()
        self._runs_forgotten += 1
        if reason is not None:
            self._evicted[reason] = self._evicted.get(reason, 0) + 1

    @staticmethod
    def _standing(r: _Run) -> Standing:
        return Standing(r.name, r.finished, r.last_time, active=len(r.active), stopping=r.stop_reason is not None,
                        steps=len(r.history), nbytes=r.memory.total, created=r.memory.created)

    def _evict(self, reason: str, count: int = 0, free_bytes: int = 0) -> None:
        """Evict at least ``count`` runs and enough to free ``free_bytes`` (caller holds ``self._lock``)."""
        chosen = victims([self._standing(r) for r in self._runs.values()], self._clock(), self.config.idle_after_s,
                         count=count, free_bytes=free_bytes)
        if chosen:
            log.warning("forgetting %d runs (%s: %d runs, %d bytes held; limits %d runs, %d bytes): %s%s",
                        len(chosen), reason, len(self._runs), self._ledger.total, self.config.max_runs,
                        self.config.max_memory_bytes, ", ".join(s.name for s in chosen[:5]),
                        "..." if len(chosen) > 5 else "")
        for s in chosen:
            self._retire(self._runs[s.name], reason)

    def _enforce_memory(self) -> None:
        """Evict runs while the runs hold more than ``max_memory_bytes`` (a little more, so as not to evict at
        every message near the limit); the only run left is kept."""
        limit = self.config.max_memory_bytes
        if not limit or self._ledger.total <= limit:
            return
        with self._lock:
            over = self._ledger.total - limit
            if over > 0:
                self._evict("memory", free_bytes=over + limit // 32)

    def _retire_finished(self, now: float) -> None:
        """Forget runs finished ``finished_ttl_s`` ago or more (caller holds ``self._lock``); the time runs from
        the first tick that saw the run finished."""
        for r in list(self._runs.values()):
            if not r.finished:
                r.memory.finished_at = None
            elif r.memory.finished_at is None:
                r.memory.finished_at = now
            elif now - r.memory.finished_at >= self.config.finished_ttl_s:
                log.info("run %s finished %.0f s ago: forgotten", r.name, now - r.memory.finished_at)
                self._retire(r, "finished_ttl")

    def _end(self, run: _Run, msg: RunEnd) -> list[StepStats]:
        if msg.attempt != run.attempt:
            self._check_attempt(run, msg)
            raise Rejected(RejectReason.unknown_rank, f"rank {msg.rank} of {msg.run} sent no layout for attempt "
                                                      f"{msg.attempt!r}")
        if msg.rank not in run.layouts:
            raise Rejected(RejectReason.unknown_rank, f"rank {msg.rank} of {msg.run} sent no layout")
        run.ended.add(msg.rank)
        if len(run.ended) >= run.world_size:
            run.finished = True
            return self._merge_ready(run, force=True)
        return []

    def note_dropped(self, run: str, dropped: int) -> None:
        """Add reports that ``run``'s senders dropped before they reached the aggregator."""
        with self._lock:
            r = self._runs.get(run)
        if r is not None and dropped > 0:
            with r.lock:
                r.sender_dropped += int(dropped)
                self._publish(r)

    def note_rejected(self, reason: RejectReason, n: int = 1) -> None:
        """Count ``n`` messages refused before they reached the aggregator (``unauthorized``: no run is touched)."""
        with self._lock:
            self._rejected[reason.value] = self._rejected.get(reason.value, 0) + int(n)

    def _ingest(self, run: _Run, rep: StepReport) -> list[StepStats]:
        if rep.attempt != run.attempt:  # a late report of an old attempt, or of one whose layout the service lost
            self._check_attempt(run, rep)
            raise Rejected(RejectReason.unknown_rank, f"rank {rep.rank} of {rep.run} sent no layout for attempt "
                                                      f"{rep.attempt!r}")
        lay = run.layouts.get(rep.rank)
        if lay is None:
            raise Rejected(RejectReason.unknown_rank, f"rank {rep.rank} of {rep.run} sent no layout")
        expected = len(lay.layers) if lay.reports_layers else 0
        if rep.n_layers != expected:
            raise Rejected(RejectReason.shape_mismatch, f"{rep.n_layers} layers, layout has {expected}")
        if rep.step <= run.last_step:
            raise Rejected(RejectReason.stale_step, f"step {rep.step} of {rep.run} is already merged")
        newest = max(run.last_step, max(run.rank_last_step.values(), default=-1))
        if newest >= 0 and rep.step - newest > self.config.max_step_jump:
            raise Rejected(RejectReason.step_jump, f"step {rep.step} of {rep.run} is more than "
                                                   f"{self.config.max_step_jump} ahead of its step {newest}")
        slot = run.pending.setdefault(rep.step, {})
        if rep.rank in slot:
            raise Rejected(RejectReason.duplicate, f"rank {rep.rank} already reported step {rep.step}")
        slot[rep.rank] = rep
        run.rank_last_step[rep.rank] = max(run.rank_last_step.get(rep.rank, -1), rep.step)
        run.pending_since.setdefault(rep.step, self._clock())
        return self._merge_ready(run)

    # ---- merging --------------------------------------------------------------------------------
    def _merge_ready(self, run: _Run, force: bool = False) -> list[StepStats]:
        """Merge the run's steps that are ready (caller holds ``run.lock``); returns them, to be judged."""
        merged: list[StepStats] = []
        now = self._clock()
        while run.pending:
            step = min(run.pending)
            got = run.pending[step]
            complete = len(got) >= run.world_size
            # each rank's reports arrive in order, so a rank already past this step will not send it any more
            overtaken = all(run.rank_last_step.get(r, -1) > step for r in range(run.world_size) if r not in got)
            overdue = now - run.pending_since[step] > self.config.merge_timeout_s
            crowded = len(run.pending) > self.config.max_pending_steps
            if not (complete or overtaken or overdue or crowded or force):
                break
            reports = run.pending.pop(step)
            run.pending_since.pop(step, None)
            stats = self._merge_step(run, step, reports)
            if stats is not None:
                self._begin_step(run, stats)
                merged.append(stats)
        return merged

    def _merge_step(self, run: _Run, step: int, reports: dict[int, StepReport]) -> StepStats | None:
        layer_reports = [r for rank, r in sorted(reports.items()) if run.layouts[rank].reports_layers]
        if not layer_reports:  # heartbeats only: nothing to judge
            return None
        grads = merge_shards([r.grad_stats(run.layers, run.units) for r in layer_reports], run.sharded)
        first = layer_reports[0]
        ws = run.world_size
        rank_norm = np.full(ws, np.nan)
        rank_nonfinite = np.zeros(ws, bool)
        step_time = np.full(ws, np.nan)
        compute_time = np.full(ws, np.nan)
        for rank, r in reports.items():
            if r.local_norm is not None:
                rank_norm[rank] = r.local_norm
            rank_nonfinite[rank] = r.local_nonfinite
            if r.step_time is not None:
                step_time[rank] = r.step_time
            if r.compute_time is not None:
                compute_time[rank] = r.compute_time
        stats = StepStats(
            run=run.name,
            step=step,
            grads=grads,
            time=max(r.time for r in reports.values()) or self._clock(),
            loss=first.loss,
            lr=first.lr,
            loss_scale=first.loss_scale,
            skipped=any(r.skipped for r in reports.values()),
            rank_norm=rank_norm if ws > 1 else None,
            rank_nonfinite=rank_nonfinite if ws > 1 else None,
            step_time=step_time,
            compute_time=compute_time if np.isfinite(compute_time).any() else None,
            missing_ranks=tuple(sorted(set(range(ws)) - set(reports))),
        )
        with self._lock:
            self._layer_stats_merged += len(grads) * len(layer_reports)
        return stats

    def _begin_step(self, run: _Run, stats: StepStats) -> None:
        """Take a merged step into the run's history (caller holds ``run.lock``), before it is judged."""
        run.history.append(stats)
        run.last_step = stats.step
        run.last_time = self._clock()

    # ---- detectors ------------------------------------------------------------------------------
    def _judge_steps(self, run: _Run, steps: Sequence[StepStats]) -> list[Finding]:
        """Run the detectors on ``steps`` in order and settle their findings. The caller holds ``run.judging``
        and not ``run.lock``: the detectors run without any lock that another run or a reader needs."""
        new: list[Finding] = []
        for stats in steps:
            with run.lock:
                detectors = [(n, d) for n, d in run.detectors.items() if n not in run.disabled]
            outcomes = self._call_detectors(stats, detectors)
            with run.lock:
                new.extend(self._settle(run, stats, outcomes))
                self._publish(run)
        return new

    def _call_detectors(self, stats: StepStats, detectors: Sequence[tuple[str, Detector]]) -> list[_Outcome]:
        """Each detector's outcome on ``stats``, in order; a call past the time budget is given up on."""
        budget = self.config.detector_time_budget_s
        outcomes: list[_Outcome] = []
        while detectors:
            job = _Job(stats, detectors)
            self._workers.start(job)
            with job.cond:
                idle_waits = 0
                while len(job.outcomes) < len(detectors):
                    started = job.started
                    if started is None:  # between calls, or the worker has not picked the job up yet
                        done = len(job.outcomes)
                        job.cond.wait(budget)
                        idle_waits = idle_waits + 1 if len(job.outcomes) == done and job.started is None else 0
                        if idle_waits < 2:
                            continue
                    elif (left := started + budget - time.perf_counter()) > 0:
                        job.cond.wait(left)
                        continue
                    job.abandoned = True
                    break
                done_outcomes = list(job.outcomes)
            outcomes.extend(done_outcomes)
            if len(done_outcomes) == len(detectors):
                break
            name = detectors[len(done_outcomes)][0]
            outcomes.append(_Outcome(name, None, None, budget, timed_out=True))
            detectors = detectors[len(done_outcomes) + 1:]
        return outcomes

    def _settle(self, run: _Run, stats: StepStats, outcomes: Sequence[_Outcome]) -> list[Finding]:
        """Take the detectors' outcomes on ``stats`` into the run's findings (caller holds ``run.lock``)."""
        raised: dict[tuple[str, str], Finding] = {}
        silent: set[str] = {DETECTOR_DISABLED}
        budget = self.config.detector_error_budget
        for o in outcomes:
            run.detector_seconds[o.name] = run.detector_seconds.get(o.name, 0.0) + o.seconds
            if o.found is not None:
                for f in o.found:
                    raised[f.identity] = f
                continue
            silent.add(o.name)  # no verdict on this step: its findings stay as they are
            if o.timed_out:
                run.detector_errors[o.name] = run.detector_errors.get(o.name, 0) + 1
                why = (f"it took more than its time budget of {self.config.detector_time_budget_s:g} s "
                       f"(detector_time_budget_s) on step {stats.step}")
                f = self._disable(run, stats, o.name, "time", why)
                raised[f.identity] = f
            elif o.error is not None:
                run.detector_errors[o.name] = run.detector_errors.get(o.name, 0) + 1
                run.strikes[o.name] = run.strikes.get(o.name, 0) + 1
                self._log_error(run, o.name, stats.step, o.error)
                if run.strikes[o.name] >= budget:
                    why = (f"{run.strikes[o.name]} errors, its budget (detector_error_budget); the last: "
                           f"{type(o.error).__name__}: {o.error}")
                    f = self._disable(run, stats, o.name, "errors", why)
                    raised[f.identity] = f
        silent.update(run.disabled)
        new: list[Finding] = []
        for ident, f in raised.items():
            rec = run.active.get(ident)
            if rec is not None:  # still active: the finding as first raised, seen again at this step
                rec.seen(f, stats.step)
                continue
            rec = _Record.new(f, stats.step, len(run.config_changes), run.attempt)
            run.active[ident] = rec
            run.log.append(rec)
            key = (f.detector, f.severity.value)
            run.findings_total[key] = run.findings_total.get(key, 0) + 1
            new.append(rec.copy())
            judge = run.detectors.get(f.detector)
            if judge is not None and judge.config.stop_run and run.stop_reason is None:
                run.stop_reason = f"{f.detector}: {f.message}"
        now = self._clock()
        for ident in [i for i in run.active if i not in raised and i[0] not in silent]:
            self._clear(run, ident, now)
        return new

    @staticmethod
    def _clear(run: _Run, ident: tuple[str, str], now: float) -> None:
        rec = run.active.pop(ident)
        rec.active = False
        rec.cleared_time = now
        run.cleared.append(rec)

    @staticmethod
    def _disable(run: _Run, stats: StepStats, name: str, reason: str, why: str) -> Finding:
        """Disable detector ``name`` for ``run``; returns the ``detector_disabled`` finding that says so."""
        run.disabled[name] = reason
        run.strikes.pop(name, None)
        log.warning("detector %s is disabled for run %s: %s", name, run.name, why)
        return Finding(
            detector=DETECTOR_DISABLED, severity=Severity.warning, run=stats.run, step=stats.step, key=name,
            message=f"detector {name} is disabled for this run: {why}. Its findings are no longer updated; fix or "
                    f"remove the plugin, then re-enable it with `gfservice configure {run.name} --set "
                    f"{name}.enabled=true` or by restarting the service.",
        )

    @staticmethod
    def _log_error(run: _Run, name: str, step: int, exc: BaseException) -> None:
        """Log a detector's first error on ``run`` in full; later ones as one summary line a minute."""
        now = time.monotonic()
        entry = run.error_log.get(name)
        if entry is None:
            run.error_log[name] = [now, 0, ""]
            log.error("detector %s failed on run %s step %d (later errors of it on this run are summarised "
                      "once a minute)", name, run.name, step, exc_info=exc)
            return
        entry[1] += 1
        entry[2] = f"{type(exc).__name__}: {exc}"
        if now - entry[0] >= _ERROR_LOG_INTERVAL_S:
            log.error("detector %s failed %d more times on run %s in the last %.0f s (the last at step %d: %s)",
                      name, entry[1], run.name, now - entry[0], step, entry[2])
            entry[0], entry[1] = now, 0

    def flush(self, run: str | None = None) -> list[Finding]:
        """Merge every waiting step now (all runs, or one), missing ranks or not."""
        with self._lock:
            runs = [self._runs[run]] if run else list(self._runs.values())
        new: list[Finding] = []
        for r in runs:
            with r.judging:
                with r.lock:
                    steps = self._merge_ready(r, force=True)
                    self._publish(r)
                new.extend(self._judge_steps(r, steps))
        return new

    def tick(self) -> list[Finding]:
        """Merge the steps whose ranks are overdue and retire long-idle runs; call it periodically.

        A run busy judging a step is left for the next tick.
        """
        with self._lock:
            now = self._clock()
            self._retire_finished(now)
            runs = list(self._runs.values())
        self._enforce_memory()
        new: list[Finding] = []
        for r in runs:
            if not r.judging.acquire(blocking=False):
                continue
            try:
                with r.lock:
                    if not r.finished and r.last_time and now - r.last_time > self.config.idle_finish_s:
                        log.warning("run %s sent nothing for %.0f s: taking it as over", r.name, now - r.last_time)
                        r.finished = True
                        self._publish(r)
                    steps = self._merge_ready(r)
                new.extend(self._judge_steps(r, steps))
            finally:
                r.judging.release()
        return new

    # ---- replay and live reconfiguration -------------------------------------------------------
    def replay(self, run: str, steps: Sequence[StepStats],
               progress: Callable[[int], None] | None = None) -> list[Finding]:
        """Judge already merged ``steps`` (oldest first, as :meth:`history` returns them) as a new run ``run``.

        The steps go through the very detectors and finding lifecycle that live reports go through, so the
        result is what the service would have raised (``gfservice backtest`` is built on it). Returns the
        run's findings (:meth:`findings`) at the end; ``progress(i)`` is called after the ``i``-th step.
        Raises ``ValueError`` when ``run`` already exists. A step number that goes back down is a restarted
        attempt of the run (its history holds them one after the other): replay goes on through it.
        """
        world = 1
        for s in steps:
            for ranks in (s.rank_norm, s.step_time):
                if ranks is not None:
                    world = max(world, len(ranks))
        with self._lock:
            if run in self._runs:
                raise ValueError(f"run {run!r} exists: replay into a new run name")
            r = self._new_run(run, world)
            if steps:
                r.layers = tuple(steps[0].grads.layers)
                r.units = steps[0].grads.units
            with r.lock:
                self._publish(r)
        for i, stats in enumerate(steps, 1):
            with r.judging:
                with r.lock:
                    if stats.step <= r.last_step:  # a restarted attempt of the run: its steps start again
                        r.last_step = -1
                    self._begin_step(r, stats)
                self._judge_steps(r, [stats])
            if progress is not None:
                progress(i)
        return self.findings(run)

    def configure(self, run: str, detector_settings: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Change the detectors of the live ``run`` from its next step on, without restarting anything.

        ``detector_settings`` maps detector names to the fields to set (as the ``[detectors]`` section of a
        configuration file); fields not named keep their current value, detectors not named are untouched,
        ``enabled = false`` removes a detector from the run and ``enabled = true`` adds one. A changed detector
        is built anew and takes the state of the one it replaces where the detector allows it (same class,
        :meth:`~gfservice.api.Detector.load_state_dict`), else it starts fresh and the summary says so.
        A detector disabled for the run (past its error or time budget) that is named comes back, fresh.
        Findings raised afterwards carry the new configuration version.

        Everything is validated before anything changes: ``ConfigError`` names the detector and the field;
        ``KeyError`` for an unknown run. Returns a plain summary: ``run``, ``step`` (the first step judged
        with it), ``version``, ``changed`` and, per named detector, ``fields`` (field -> [old, new]) and
        ``state`` ("carried over", "fresh: why", "added", "removed", "unchanged", "re-enabled" or "not running").
        """
        with self._lock:
            r = self._get(run)
        with r.judging, r.lock:
            plan = self._plan(r, detector_settings)
            summary = self._apply(r, plan, carry=True)
            changed = {name: given for name, (_, _, given, fields) in plan.items() if fields}
            if changed:
                r.config_changes.append((r.last_step + 1, changed))
            self._publish(r)
            return {"run": run, "step": r.last_step + 1, "version": len(r.config_changes),
                    "changed": bool(changed), "detectors": summary}

    def config_changes(self, run: str) -> list[tuple[int, dict[str, dict[str, Any]]]]:
        """The detector configuration changes of ``run``: (first step, detector -> fields set), oldest first."""
        r = self._get_locked(run)
        with r.lock:
            return copy.deepcopy(r.config_changes)

    def _plan(self, r: _Run, settings: Mapping[str, Mapping[str, Any]]
              ) -> dict[str, tuple[Detector | None, Detector, dict[str, Any], dict[str, list[Any]]]]:
        """Validate ``settings`` against ``r``'s detectors and build the new ones; changes nothing.

        Returns, per named detector: the current one (or None), the new one, the fields as given (validated,
        plain values) and the fields that change (field -> [old, new]).
        """
        if not isinstance(settings, Mapping):
            raise ConfigError(f"detector settings must map detector names to fields, not {type(settings).__name__}")
        classes: dict[str, type[Detector]] = dict(registry.available())
        if self._custom_factory and any(n not in r.detectors and n not in classes for n in settings):
            classes.update({n: type(d) for n, d in self._factory().items()})  # a detector taken off the run
        plan: dict[str, tuple[Detector | None, Detector, dict[str, Any], dict[str, list[Any]]]] = {}
        for name, fields in settings.items():
            if not isinstance(fields, Mapping):
                raise ConfigError(f"detector {name!r}: expected a table of fields, not {fields!r}")
            old = r.detectors.get(name)
            cls = type(old) if old is not None else classes.get(name)
            if cls is None:
                raise ConfigError(f"unknown detector {name!r}; installed: {', '.join(classes)}")
            base = dict(self._detector_settings.get(name, {}))
            for _, earlier in r.config_changes:  # a detector off the run keeps the fields set for it meanwhile
                base.update(earlier.get(name, {}))
            try:
                current = old.config if old is not None else cls(base).config
                new = cls({**current.model_dump(), **fields})
            except Exception as exc:  # pydantic's ValidationError names the field; a detector may raise others
                errors = getattr(exc, "errors", None)
                problems = ("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())
                            if callable(errors) else str(exc))
                raise ConfigError(f"detector {name!r}: {problems}") from None
            before, after = current.model_dump(mode="json"), new.config.model_dump(mode="json")
            if old is None:
                before["enabled"] = False  # not on the run, whatever its configuration says
            changes = {f: [before.get(f), after.get(f)] for f in after if before.get(f) != after.get(f)}
            plan[name] = (old, new, {f: after[f] for f in fields}, changes)
        return plan

    def _apply(self, r: _Run, plan: Mapping[str, tuple[Detector | None, Detector, dict[str, Any],
                                                     dict[str, list[Any]]]], carry: bool) -> dict[str, Any]:
        """Swap in the planned detectors; with ``carry``, the replaced ones hand over their state."""
        summary: dict[str, Any] = {}
        for name, (old, new, _given, changes) in plan.items():
            enabled = new.config.enabled
            if name in r.disabled:  # named again: it comes back, fresh (its old self may still be stuck)
                del r.disabled[name]
                r.error_log.pop(name, None)
                if (DETECTOR_DISABLED, name) in r.active:
                    self._clear(r, (DETECTOR_DISABLED, name), self._clock())
                if enabled:
                    r.detectors[name] = new
                else:
                    r.detectors.pop(name, None)
                summary[name] = {"fields": changes, "state": "re-enabled" if enabled else "removed"}
                continue
            if not changes:
                state = "unchanged" if old is not None else "not running"
            elif not enabled:
                state = "removed" if old is not None else "not running"
                r.detectors.pop(name, None)
            elif old is None:
                state = "added"
                r.detectors[name] = new
            else:
                state = "carried over" if carry else "fresh"
                if carry:
                    try:
                        if type(new) is not type(old):
                            raise TypeError(f"{type(old).__name__} is now {type(new).__name__}")
                        new.load_state_dict(copy.deepcopy(old.state_dict()))
                    except Exception as exc:  # the detector cannot take its old state: start it afresh
                        new = type(new)(new.config)
                        state = f"fresh: its state did not carry over ({type(exc).__name__}: {exc})"
                        log.warning("detector %s of run %s starts fresh after configure: %s", name, r.name, exc)
                r.detectors[name] = new
            summary[name] = {"fields": changes, "state": state}
        return summary

    # ---- the read view --------------------------------------------------------------------------
    def _publish(self, r: _Run) -> None:
        """Replace what readers see of ``r`` (caller holds ``r.lock``): cheap copies, no findings built."""
        fields = dict(
            name=r.name, world_size=r.world_size, layers=len(r.layers), last_step=r.last_step,
            last_time=r.last_time, finished=r.finished, stop_reason=r.stop_reason, sender_dropped=r.sender_dropped,
            latest=r.history[-1] if r.history else None, findings_total=dict(r.findings_total),
            detector_seconds=dict(r.detector_seconds), detector_errors=dict(r.detector_errors),
            detector_configs={n: d.config for n, d in r.detectors.items()},
            attempt=r.attempt, attempts=r.attempt_count, rejected=dict(r.rejected),
            disabled_detectors=dict(r.disabled), memory_bytes=r.memory.total,
        )
        r.published = _Published(fields, tuple(copy.copy(rec) for rec in r.active.values()), tuple(r.cleared))

    def view(self, since: float | None = None) -> AggregatorView:
        """A frozen copy of every run and counter; never waits for a run's detectors.

        ``since`` (a Unix time) bounds the cleared findings each run carries: those cleared at or after it.
        """
        with self._lock:
            now = self._clock()
            published = [r.published for r in self._runs.values()]
            seconds = dict(self._retired_seconds)
            errors = dict(self._retired_errors)
            counters = (self._accepted, dict(self._rejected), self._ingest_seconds, self._ingest_count,
                        self._layer_stats_merged, self._runs_forgotten)
            evicted, memory = dict(self._evicted), self._ledger.total
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
            memory_limit_bytes=self.config.max_memory_bytes,
        )

    def run_view(self, run: str, since: float | None = None) -> RunView:
        """One run's view; raises ``KeyError`` for an unknown run."""
        with self._lock:
            r = self._get(run)
            now = self._clock()
        if r.published is None:
            with r.lock:
                self._publish(r)
        assert r.published is not None
        return r.published.run_view(now if since is None else since)

    def _get(self, run: str) -> _Run:
        try:
            return self._runs[run]
        except KeyError:
            raise KeyError(f"unknown run {run!r}") from None

    def _get_locked(self, run: str) -> _Run:
        with self._lock:
            return self._get(run)

    # ---- queries --------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        """One summary row per run."""
        return [r.row() for r in self.view().runs]

    def findings(self, run: str, since_step: int = 0, active_only: bool = False) -> list[Finding]:
        """Copies of the findings of ``run`` first raised at or after ``since_step``, oldest first."""
        r = self._get_locked(run)
        with r.lock:
            recs = [copy.copy(rec) for rec in r.log if rec.first_step >= since_step]
        return [rec.copy() for rec in recs if rec.active or not active_only]

    def active_findings(self, run: str) -> list[Finding]:
        """Copies of the active findings of ``run``, most severe first."""
        return list(self.run_view(run).active)

    def latest(self, run: str) -> StepStats | None:
        r = self._get_locked(run)
        with r.lock:
            return r.history[-1] if r.history else None

    def history(self, run: str) -> list[StepStats]:
        r = self._get_locked(run)
        with r.lock:
            return list(r.history)

    def should_stop(self, run: str) -> str | None:
        """Why ``run`` should stop (a detector with ``stop_run`` fired), or ``None``."""
        with self._lock:
            r = self._runs.get(run)
            return None if r is None else r.stop_reason

    def counters(self) -> dict[str, Any]:
        v = self.view()
        return {"accepted": v.accepted, "rejected": dict(v.rejected), "layer_stats_merged": v.layer_stats_merged,
                "runs": len(v.runs)}

    @property
    def accepted(self) -> int:
        """Messages taken so far."""
        return self._accepted

    # ---- snapshots ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Detector state, findings and layouts of every run (not the step history): enough to resume.

        Never breaks on one run: a detector whose state cannot be saved is left out (it starts fresh on
        restore), and a run still busy judging a step after a short wait keeps the detector states of its last
        snapshot. Disabled detectors are left out too.
        """
        with self._lock:
            runs = list(self._runs.values())
            accepted, rejected = self._accepted, dict(self._rejected)
        return {"runs": {r.name: self._run_state(r) for r in runs}, "accepted": accepted, "rejected": rejected}

    def _run_state(self, r: _Run) -> dict[str, Any]:
        judging = r.judging.acquire(timeout=_SNAPSHOT_WAIT_S)
        try:
            with r.lock:
                if judging:
                    r.saved_detectors = {n: s for n, d in r.detectors.items() if n not in r.disabled
                                         if (s := self._detector_state(r, n, d)) is not None}
                else:
                    log.warning("run %s is busy judging a step: its snapshot keeps the detector states of the "
                                "previous one", r.name)
                return self._run_state_locked(r)
        finally:
            if judging:
                r.judging.release()

    @staticmethod
    def _detector_state(r: _Run, name: str, det: Detector) -> dict[str, Any] | None:
        """A copy of ``det``'s state that a snapshot can hold, or None (logged once per run) when there is none."""
        try:
            state = copy.deepcopy(det.state_dict())  # copied now: the snapshot is written later, on another thread
            if not isinstance(state, Mapping):
                raise TypeError(f"state_dict returned {type(state).__name__}, not a mapping")
            encode(state, f"detector {name} of run {r.name}")
            return dict(state)
        except Exception as exc:
            if name not in r.unsaveable:
                r.unsaveable.add(name)
                log.error("the state of detector %s of run %s cannot be saved (it restarts fresh after a restore): "
                          "%s: %s", name, r.name, type(exc).__name__, exc)
            return None

    @staticmethod
    def _run_state_locked(r: _Run) -> dict[str, Any]:
        logged = {id(rec) for rec in r.log}
        return {
            "world_size": r.world_size,
            **_layouts_state(r.layouts.values()),
            "detectors": dict(r.saved_detectors),
            "log": [rec.to_dict() for rec in r.log],
            # active findings old enough to have left the bounded log
            "active": [rec.to_dict() for rec in r.active.values() if id(rec) not in logged],
            "last_step": r.last_step,
            "last_time": r.last_time,
            "findings_total": [[d, s, n] for (d, s), n in r.findings_total.items()],
            "stop_reason": r.stop_reason,
            "sender_dropped": r.sender_dropped,
            "finished": r.finished,
            "ended": sorted(r.ended),
            "config_changes": [[step, settings] for step, settings in r.config_changes],
            "attempt": r.attempt,
            "attempts": list(r.attempts),
            "attempt_count": r.attempt_count,
            "rejected": dict(r.rejected),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            for name, s in state.get("runs", {}).items():
                run = self._new_run(name, s["world_size"], s.get("attempt", ""))
                run.attempts.clear()
                run.attempts.extend(a for a in s.get("attempts", []) if a != run.attempt)
                run.attempts.append(run.attempt)  # the current one newest
                run.attempt_count = max(1, int(s.get("attempt_count", 1)))
                tables = s.get("layout_tables", [])
                for lay in s["layouts"]:
                    body = tables[lay["table"]] if "table" in lay else {}
                    try:
                        saved = parse({**{k: v for k, v in lay.items() if k != "table"}, **body}, self.config)
                        if isinstance(saved, Layout):  # validated like a live one: a Rejected, never a crash
                            self._register(saved)
                    except Rejected as exc:  # saved before the checks of today: the run goes on without it
                        log.warning("run %s: a saved layout is refused now: %s", name, exc)
                for step, settings in s.get("config_changes", []):  # the run's live reconfigurations, in order
                    try:
                        self._apply(run, self._plan(run, settings), carry=False)
                    except ConfigError as exc:
                        log.warning("run %s: configuration change at step %d no longer applies: %s", name, step, exc)
                    run.config_changes.append((int(step), dict(settings)))
                for n, d in list(run.detectors.items()):
                    if n in s["detectors"]:
                        try:
                            d.load_state_dict(s["detectors"][n])
                        except Exception as exc:  # a plugin that cannot take its saved state starts fresh
                            log.error("detector %s of run %s cannot load its saved state (it starts fresh): %s: %s",
                                      n, name, type(exc).__name__, exc)
                            run.detectors[n] = type(d)(d.config)
                logged = [_Record.from_dict(d) for d in s["log"]]
                run.log.extend(logged)
                for rec in [*logged, *(_Record.from_dict(d) for d in s.get("active", []))]:
                    if rec.active:
                        run.active[rec.raised.identity] = rec
                cleared = [rec for rec in logged if not rec.active and rec.cleared_time is not None]
                run.cleared.extend(sorted(cleared, key=lambda rec: rec.cleared_time or 0.0))
                run.last_step = s["last_step"]
                run.last_time = s["last_time"]
                run.findings_total = {(d, sev): n for d, sev, n in s["findings_total"]}
                run.stop_reason = s["stop_reason"]
                run.sender_dropped = s.get("sender_dropped", 0)
                run.finished = s.get("finished", False)
                run.ended = {int(rank) for rank in s.get("ended", [])}
                run.rejected = {str(k): int(v) for k, v in s.get("rejected", {}).items()}
                for ident in [i for i in run.active if i[0] == DETECTOR_DISABLED]:  # a restart re-enables them
                    self._clear(run, ident, self._clock())
                with run.lock:
                    self._publish(run)
            self._accepted = state.get("accepted", 0)
            self._rejected = dict(state.get("rejected", {}))


def _check_consistent(run: _Run, lay: Layout) -> None:
    """Raise ``layout_mismatch`` when ``lay`` disagrees with another rank's layout of ``run`` on what all ranks
    share: the sharded flags, the full sizes (``numel``) and the output units of every layer."""
    ref = next((o for r, o in run.layouts.items() if r != lay.rank and o.reports_layers), None)
    if ref is None:
        return
    for what, mine, theirs in (("sharded flags", lay.sharded, ref.sharded), ("sizes (numel)", lay.numel, ref.numel),
                               ("units", lay.units, ref.units)):
        if mine != theirs and (what != "units" or (mine and theirs)):
            i = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), min(len(mine),
                                                                                                    len(theirs)))
            layer = lay.layers[i] if i < len(lay.layers) else "?"
            raise Rejected(RejectReason.layout_mismatch,
                           f"rank {lay.rank} of {lay.run} reports other {what} than rank {ref.rank} "
                           f"(first at layer {layer})")


_LAYOUT_BODY = ("layers", "numel", "sharded", "units")


def _layouts_state(layouts: Iterable[Layout]) -> dict[str, Any]:
    """The layouts of a run as plain data, each distinct layer table stored once (256 ranks of a 1,000-layer
    model share one: without this a snapshot holds every layer name 256 times, megabytes to encode)."""
    tables: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for lay in layouts:
        d = lay.model_dump(mode="json", exclude=set(_LAYOUT_BODY))
        body = {k: getattr(lay, k) for k in _LAYOUT_BODY}
        for i, known in enumerate(tables):
            if known == body:
                d["table"] = i
                break
        else:
            d["table"] = len(tables)
            tables.append(body)
        out.append(d)
    return {"layouts": out, "layout_tables": [{k: list(v) for k, v in b.items()} for b in tables]}

