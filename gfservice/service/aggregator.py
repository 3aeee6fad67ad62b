"""The aggregator core (plain Python, no Ray, no torch): validate messages, merge ranks into steps, run
detectors, keep findings with their lifecycle and a bounded history per run.

The aggregator owns its state and its lock. Readers (the exporter, ``status``, the client, reports) get a
frozen, consistent :class:`AggregatorView` copied under the lock (:meth:`Aggregator.view`), or copies of
findings: nothing they hold changes under them, and nothing they do holds the lock.

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

import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from gfservice import registry
from gfservice.api import Detector, DetectorConfig, Finding, Severity, StepStats
from gfservice.config import AggregatorConfig
from gfservice.registry import ConfigError
from gfservice.stats import Array, merge_shards
from gfservice.wire import Layout, Rejected, RejectReason, RunEnd, StepReport, parse

__all__ = ["Ack", "Aggregator", "AggregatorConfig", "AggregatorView", "RunView"]

log = logging.getLogger(__name__)

#: Attempts of a run remembered to tell a late message of an old attempt (stale_attempt) from a new one.
_ATTEMPTS_KEPT = 64


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


class Aggregator:
    """Merges reports of many runs and ranks and runs the detectors; thread-safe.

    ``detector_settings`` maps detector names to field overrides (see :mod:`gfservice.registry`);
    ``detector_factory`` replaces the registry entirely (tests, embedding). ``clock`` (like
    :func:`time.time`) stamps merges and cleared findings.
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
        self._lock = threading.Lock()
        self._accepted = 0
        self._rejected: dict[str, int] = {}
        self._layer_stats_merged = 0
        self._ingest_seconds = 0.0
        self._ingest_count = 0
        self._retired_seconds: dict[str, float] = {}
        self._retired_errors: dict[str, int] = {}
        self._runs_forgotten = 0

    # ---- ingest ---------------------------------------------------------------------------------
    def submit(self, message: Layout | StepReport | RunEnd | Mapping[str, Any]) -> Ack:
        """Validate and take one message (a message object or a plain dict); never raises for bad input."""
        t0 = time.perf_counter()
        try:
            msg = parse(message)  # outside the lock: validation is the costly part
            with self._lock:
                new: list[Finding] = []
                if isinstance(msg, Layout):
                    self._register(msg)
                elif isinstance(msg, RunEnd):
                    new = self._end(msg)
                else:
                    new = self._ingest(msg)
                self._accepted += 1
                self._count_ingest(t0)
            return Ack(True, None, tuple(new))
        except Rejected as exc:
            with self._lock:
                self._rejected[exc.reason.value] = self._rejected.get(exc.reason.value, 0) + 1
                self._count_ingest(t0)
            log.debug("rejected message: %s", exc)
            return Ack(False, exc.reason)

    def _count_ingest(self, t0: float) -> None:
        self._ingest_seconds += time.perf_counter() - t0
        self._ingest_count += 1

    def _register(self, lay: Layout) -> None:
        if len(lay.layers) > self.config.max_layers:
            raise Rejected(RejectReason.oversized, f"{len(lay.layers)} layers, limit {self.config.max_layers}")
        run = self._runs.get(lay.run)
        if run is not None and lay.attempt != run.attempt:
            self._check_attempt(run, lay)  # an older attempt raises stale_attempt
            self._new_attempt(run, lay)
        elif run is None or run.world_size != lay.world_size:
            if run is not None:
                log.info("run %s restarted with world size %d", lay.run, lay.world_size)
            run = self._new_run(lay.run, lay.world_size, lay.attempt)
        if lay.reports_layers:
            if run.layers and tuple(lay.layers) != run.layers:
                raise Rejected(RejectReason.layout_mismatch, f"rank {lay.rank} of {lay.run} reports other layers")
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
        run.layouts = {}
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
        if name not in self._runs and len(self._runs) >= self.config.max_runs:
            oldest = min(self._runs.values(), key=lambda r: r.last_time)
            log.warning("forgetting run %s: more than %d runs", oldest.name, self.config.max_runs)
            self._retire(oldest)
        old = self._runs.get(name)
        if old is not None:
            self._retire(old)
        cap = self.config.findings_history
        run = _Run(name=name, world_size=world_size, detectors=self._factory(),
                   history=deque(maxlen=self.config.history), log=deque(maxlen=cap), cleared=deque(maxlen=cap),
                   attempt=attempt)
        run.attempts.append(attempt)
        self._runs[name] = run
        return run

    def _retire(self, run: _Run) -> None:
        """Forget ``run``, keeping its detector time and errors in the service-wide totals."""
        for d, v in run.detector_seconds.items():
            self._retired_seconds[d] = self._retired_seconds.get(d, 0.0) + v
        for d, n in run.detector_errors.items():
            self._retired_errors[d] = self._retired_errors.get(d, 0) + n
        del self._runs[run.name]
        self._runs_forgotten += 1

    def _end(self, msg: RunEnd) -> list[Finding]:
        run = self._runs.get(msg.run)
        if run is None:
            raise Rejected(RejectReason.unknown_run, f"no layout for run {msg.run!r}")
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
                r.sender_dropped += int(dropped)

    def _ingest(self, rep: StepReport) -> list[Finding]:
        run = self._runs.get(rep.run)
        if run is None:
            raise Rejected(RejectReason.unknown_run, f"no layout for run {rep.run!r}; send the Layout first")
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
        slot = run.pending.setdefault(rep.step, {})
        if rep.rank in slot:
            raise Rejected(RejectReason.duplicate, f"rank {rep.rank} already reported step {rep.step}")
        slot[rep.rank] = rep
        run.rank_last_step[rep.rank] = max(run.rank_last_step.get(rep.rank, -1), rep.step)
        run.pending_since.setdefault(rep.step, self._clock())
        return self._merge_ready(run)

    # ---- merging --------------------------------------------------------------------------------
    def _merge_ready(self, run: _Run, force: bool = False) -> list[Finding]:
        new: list[Finding] = []
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
            new.extend(self._merge_step(run, step, reports))
        return new

    def _merge_step(self, run: _Run, step: int, reports: dict[int, StepReport]) -> list[Finding]:
        layer_reports = [r for rank, r in sorted(reports.items()) if run.layouts[rank].reports_layers]
        if not layer_reports:  # heartbeats only: nothing to judge
            return []
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
        self._layer_stats_merged += len(grads) * len(layer_reports)
        return self._run_detectors(run, stats)

    def _run_detectors(self, run: _Run, stats: StepStats) -> list[Finding]:
        run.history.append(stats)
        run.last_step = stats.step
        run.last_time = self._clock()
        raised: dict[tuple[str, str], Finding] = {}
        silent: set[str] = set()
        for name, det in run.detectors.items():
            t0 = time.perf_counter()
            try:
                found = det.update(stats)
                if found is not None and not (isinstance(found, list)
                                              and all(isinstance(f, Finding) for f in found)):
                    raise TypeError(f"update returned {type(found).__name__}, not a list of Finding")
            except Exception:
                run.detector_errors[name] = run.detector_errors.get(name, 0) + 1
                if run.detector_errors[name] <= 3:
                    log.exception("detector %s failed on run %s step %d", name, run.name, stats.step)
                silent.add(name)
                continue
            finally:
                run.detector_seconds[name] = run.detector_seconds.get(name, 0.0) + time.perf_counter() - t0
            if found is None:  # the detector did not evaluate this step: its findings stay as they are
                silent.add(name)
                continue
            for f in found:
                raised[f.identity] = f
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
            rec = run.active.pop(ident)
            rec.active = False
            rec.cleared_time = now
            run.cleared.append(rec)
        return new

    def flush(self, run: str | None = None) -> list[Finding]:
        """Merge every waiting step now (all runs, or one), missing ranks or not."""
        with self._lock:
            runs = [self._runs[run]] if run else list(self._runs.values())
            return [f for r in runs for f in self._merge_ready(r, force=True)]

    def tick(self) -> list[Finding]:
        """Merge the steps whose ranks are overdue and retire long-idle runs; call it periodically."""
        with self._lock:
            now = self._clock()
            for r in self._runs.values():
                if not r.finished and r.last_time and now - r.last_time > self.config.idle_finish_s:
                    log.warning("run %s sent nothing for %.0f s: taking it as over", r.name, now - r.last_time)
                    r.finished = True
            return [f for r in list(self._runs.values()) for f in self._merge_ready(r)]

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
        for i, stats in enumerate(steps, 1):
            with self._lock:
                if stats.step <= r.last_step:  # a restarted attempt of the run: its steps start again
                    r.last_step = -1
                self._run_detectors(r, stats)
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
        Findings raised afterwards carry the new configuration version.

        Everything is validated before anything changes: ``ConfigError`` names the detector and the field;
        ``KeyError`` for an unknown run. Returns a plain summary: ``run``, ``step`` (the first step judged
        with it), ``version``, ``changed`` and, per named detector, ``fields`` (field -> [old, new]) and
        ``state`` ("carried over", "fresh: why", "added", "removed", "unchanged" or "not running").
        """
        with self._lock:
            r = self._get(run)
            plan = self._plan(r, detector_settings)
            summary = self._apply(r, plan, carry=True)
            changed = {name: given for name, (_, _, given, fields) in plan.items() if fields}
            if changed:
                r.config_changes.append((r.last_step + 1, changed))
            return {"run": run, "step": r.last_step + 1, "version": len(r.config_changes),
                    "changed": bool(changed), "detectors": summary}

    def config_changes(self, run: str) -> list[tuple[int, dict[str, dict[str, Any]]]]:
        """The detector configuration changes of ``run``: (first step, detector -> fields set), oldest first."""
        with self._lock:
            return copy.deepcopy(self._get(run).config_changes)

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
    def view(self, since: float | None = None) -> AggregatorView:
        """A frozen copy of every run and counter, taken under the lock.

        ``since`` (a Unix time) bounds the cleared findings each run carries: those cleared at or after it.
        """
        with self._lock:
            now = self._clock()
            cutoff = now if since is None else since
            runs = tuple(self._run_view(r, cutoff) for r in self._runs.values())
            seconds = dict(self._retired_seconds)
            errors = dict(self._retired_errors)
            for r in self._runs.values():
                for d, v in r.detector_seconds.items():
                    seconds[d] = seconds.get(d, 0.0) + v
                for d, n in r.detector_errors.items():
                    errors[d] = errors.get(d, 0) + n
            return AggregatorView(
                runs=runs, accepted=self._accepted, rejected=dict(self._rejected),
                ingest_seconds=self._ingest_seconds, ingest_count=self._ingest_count,
                layer_stats_merged=self._layer_stats_merged, detector_seconds=seconds, detector_errors=errors,
                runs_forgotten=self._runs_forgotten, taken=now,
            )

    @staticmethod
    def _run_view(r: _Run, since: float) -> RunView:
        cleared: list[Finding] = []
        for rec in reversed(r.cleared):  # newest first; cleared times only grow
            if rec.cleared_time is None or rec.cleared_time < since:
                break
            cleared.append(rec.copy())
        active = sorted((rec.copy() for rec in r.active.values()), key=lambda f: -f.severity.rank)
        return RunView(
            name=r.name, world_size=r.world_size, layers=len(r.layers), last_step=r.last_step,
            last_time=r.last_time, finished=r.finished, stop_reason=r.stop_reason, sender_dropped=r.sender_dropped,
            latest=r.history[-1] if r.history else None, findings_total=dict(r.findings_total),
            active=tuple(active), recently_cleared=tuple(reversed(cleared)),
            detector_seconds=dict(r.detector_seconds), detector_errors=dict(r.detector_errors),
            detector_configs={n: d.config for n, d in r.detectors.items()},
            attempt=r.attempt, attempts=r.attempt_count,
        )

    def run_view(self, run: str, since: float | None = None) -> RunView:
        """One run's view; raises ``KeyError`` for an unknown run."""
        with self._lock:
            return self._run_view(self._get(run), self._clock() if since is None else since)

    def _get(self, run: str) -> _Run:
        try:
            return self._runs[run]
        except KeyError:
            raise KeyError(f"unknown run {run!r}") from None

    # ---- queries --------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        """One summary row per run."""
        return [r.row() for r in self.view().runs]

    def findings(self, run: str, since_step: int = 0, active_only: bool = False) -> list[Finding]:
        """Copies of the findings of ``run`` first raised at or after ``since_step``, oldest first."""
        with self._lock:
            recs = [rec for rec in self._get(run).log if rec.first_step >= since_step]
            return [rec.copy() for rec in recs if rec.active or not active_only]

    def active_findings(self, run: str) -> list[Finding]:
        """Copies of the active findings of ``run``, most severe first."""
        return list(self.run_view(run).active)

    def latest(self, run: str) -> StepStats | None:
        with self._lock:
            h = self._get(run).history
            return h[-1] if h else None

    def history(self, run: str) -> list[StepStats]:
        with self._lock:
            return list(self._get(run).history)

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
        """Detector state, findings and layouts of every run (not the step history): enough to resume."""
        with self._lock:
            return {
                "runs": {r.name: self._run_state(r) for r in self._runs.values()},
                "accepted": self._accepted,
                "rejected": dict(self._rejected),
            }

    @staticmethod
    def _run_state(r: _Run) -> dict[str, Any]:
        logged = {id(rec) for rec in r.log}
        return {
            "world_size": r.world_size,
            **_layouts_state(r.layouts.values()),
            # copied under the lock: the snapshot is written later, on another thread
            "detectors": {n: copy.deepcopy(d.state_dict()) for n, d in r.detectors.items()},
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
                    self._register(Layout.model_validate({**{k: v for k, v in lay.items() if k != "table"}, **body}))
                for step, settings in s.get("config_changes", []):  # the run's live reconfigurations, in order
                    try:
                        self._apply(run, self._plan(run, settings), carry=False)
                    except ConfigError as exc:
                        log.warning("run %s: configuration change at step %d no longer applies: %s", name, step, exc)
                    run.config_changes.append((int(step), dict(settings)))
                for n, d in run.detectors.items():
                    if n in s["detectors"]:
                        d.load_state_dict(s["detectors"][n])
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
            self._accepted = state.get("accepted", 0)
            self._rejected = dict(state.get("rejected", {}))


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

