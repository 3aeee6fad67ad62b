"""The aggregator core (plain Python, no Ray, no torch): validate messages, merge ranks into steps, run
detectors, keep findings with their lifecycle and a bounded history per run.

A thin face over rooms with one job each (their records are in :mod:`~gfservice.service.runs`):
:mod:`~gfservice.service.admission` (runs, attempts, the checks that need the run),
:mod:`~gfservice.service.eviction` (forgetting runs), :mod:`~gfservice.service.merging` (ranks into steps),
:mod:`~gfservice.service.judging` (the detector threads and their time budget),
:mod:`~gfservice.service.findings` (the findings' lifecycle), :mod:`~gfservice.service.reconfigure` (live
detector changes), :mod:`~gfservice.service.view` (the read model) and :mod:`~gfservice.service.snapshot`
(saved state).

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

Admission checks that need the run (a step too far ahead, a rank without a layout, ranks that disagree, a late
message of an earlier attempt) are :mod:`~gfservice.service.admission`'s; the stateless ones are
:func:`~gfservice.wire.parse`'s. Refusals are counted service-wide and on the run they name (``RunView.rejected``).

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
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from gfservice import registry
from gfservice.api import Detector, Finding, StepStats
from gfservice.config import AggregatorConfig
from gfservice.saved import SnapshotState
from gfservice.service import admission, eviction, judging, reconfigure, snapshot
from gfservice.service.findings import DETECTOR_DISABLED
from gfservice.service.merging import merge_ready
from gfservice.service.runs import Lineup, Run, Table, log
from gfservice.service.view import AggregatorView, RunView, publish, run_view, take_view
from gfservice.wire import Layout, Rejected, RejectReason, RunEnd, StepReport, parse

__all__ = ["DETECTOR_DISABLED", "Ack", "Aggregator", "AggregatorConfig", "AggregatorView", "RunView"]


class Ack(NamedTuple):
    """Answer to one submitted message."""

    accepted: bool
    reason: RejectReason | None = None
    new_findings: tuple[Finding, ...] = ()


class Aggregator:
    """Merges reports of many runs and ranks and runs the detectors; thread-safe.

    ``detector_settings`` maps detector names to field overrides (see :mod:`gfservice.registry`);
    ``detector_factory`` replaces the registry entirely (tests, embedding). ``clock`` (like
    :func:`time.time`) stamps merges and cleared findings, for display; ``monotonic`` (like
    :func:`time.monotonic`) times every decision: merge timeouts, idle and finished runs, time to live. A step
    of the wall clock changes no decision. ``submit`` returns the findings its message raised, synchronously,
    whichever thread the detectors ran on.
    """

    def __init__(
        self,
        config: AggregatorConfig | None = None,
        detector_settings: Mapping[str, Mapping[str, Any]] | None = None,
        detector_factory: Callable[[], dict[str, Detector]] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.config = config or AggregatorConfig()
        settings = registry.validate(detector_settings)
        # the detector settings every new run starts from (none with a ``detector_factory``)
        lineup = (Lineup({}, detector_factory, custom=True) if detector_factory
                  else Lineup(settings, lambda: registry.build(settings)))
        self._table = Table(self.config, lineup, clock, monotonic)

    @property
    def _runs(self) -> dict[str, Run]:
        """The run table (private: tests look inside a run)."""
        return self._table.runs

    # ---- ingest ---------------------------------------------------------------------------------
    def submit(self, message: Layout | StepReport | RunEnd | Mapping[str, Any]) -> Ack:
        """Validate and take one message (a message object or a plain dict); never raises for bad input."""
        table = self._table
        t0 = time.perf_counter()
        try:
            msg = parse(message, self.config)  # outside any lock: validation is the costly part
            new: list[Finding] = []
            if isinstance(msg, Layout):
                admission.take_layout(table, msg)
            else:
                run = admission.find(table, msg.run)
                with run.judging:  # waits only for this run's own detectors
                    with run.lock:
                        admission.check_current(table, run)
                        if isinstance(msg, RunEnd):
                            steps = admission.end(table, run, msg)
                            publish(run)
                        else:  # what readers see changes only with a merged step: published once judged
                            steps = admission.ingest(table, run, msg)
                    new = judging.judge_steps(table, run, steps)
            with table.lock:
                table.accepted += 1
                table.count_ingest(t0)
            eviction.enforce_memory(table)
            return Ack(True, None, tuple(new))
        except Rejected as exc:
            admission.count_rejected(table, exc.reason, message, t0)
            log.debug("rejected message: %s", exc)
            return Ack(False, exc.reason)

    def note_dropped(self, run: str, dropped: int) -> None:
        """Add reports that ``run``'s senders dropped before they reached the aggregator."""
        with self._table.lock:
            r = self._table.runs.get(run)
        if r is not None and dropped > 0:
            with r.lock:
                r.sender_dropped += int(dropped)
                publish(r)

    def note_rejected(self, reason: RejectReason, n: int = 1) -> None:
        """Count ``n`` messages refused before they reached the aggregator (``unauthorized``: no run is touched)."""
        with self._table.lock:
            self._table.rejected[reason.value] = self._table.rejected.get(reason.value, 0) + int(n)

    def flush(self, run: str | None = None, force: bool = True) -> list[Finding]:
        """Merge every waiting step now (all runs, or one), missing ranks or not; with ``force=False`` only the
        steps that are ready (every rank in, or overtaken, overdue, crowded: see
        :func:`~gfservice.service.merging.merge_ready`), so that a reader of a live job's history does not merge
        a step whose other ranks' reports are still on their way."""
        table = self._table
        with table.lock:
            runs = [table.runs[run]] if run else list(table.runs.values())
        new: list[Finding] = []
        for r in runs:
            with r.judging:
                with r.lock:
                    steps = merge_ready(table, r, force=force)
                    publish(r)
                new.extend(judging.judge_steps(table, r, steps))
        return new

    def tick(self) -> list[Finding]:
        """Merge the steps whose ranks are overdue and retire long-idle runs; call it periodically.

        A run busy judging a step is left for the next tick.
        """
        table = self._table
        with table.lock:
            now = table.monotonic()
            eviction.retire_finished(table, now)
            runs = list(table.runs.values())
        eviction.enforce_memory(table)
        new: list[Finding] = []
        for r in runs:
            if not r.judging.acquire(blocking=False):
                continue
            try:
                with r.lock:
                    if not r.finished and now - r.last_seen > self.config.idle_finish_s:
                        log.warning("run %s sent nothing for %.0f s: taking it as over (until it sends again)",
                                    r.name, now - r.last_seen)
                        r.finished = True
                        publish(r)
                    steps = merge_ready(table, r)
                new.extend(judging.judge_steps(table, r, steps))
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
        table = self._table
        world = 1
        for s in steps:
            ids = s.rank_ids
            if len(ids):
                world = max(world, int(ids.max()) + 1)
        with table.lock:
            if run in table.runs:
                raise ValueError(f"run {run!r} exists: replay into a new run name")
            r = admission.new_run(table, run, world)
            if steps:
                r.layers = tuple(steps[0].grads.layers)
                r.units = steps[0].grads.units
            with r.lock:
                publish(r)
        for i, stats in enumerate(steps, 1):
            with r.judging:
                with r.lock:
                    if stats.step <= r.last_step:  # a restarted attempt of the run: its steps start again
                        r.last_step = -1
                    r.begin_step(stats, table.clock())
                judging.judge_steps(table, r, [stats])
            if progress is not None:
                progress(i)
        return self.findings(run)

    def configure(self, run: str, detector_settings: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """Change the detectors of the live ``run`` from its next step on; see
        :func:`gfservice.service.reconfigure.configure` (``ConfigError``, or ``KeyError`` for an unknown run)."""
        return reconfigure.configure(self._table, run, detector_settings)

    def config_changes(self, run: str) -> list[tuple[int, dict[str, dict[str, Any]]]]:
        """The detector configuration changes of ``run``: (first step, detector -> fields set), oldest first."""
        return reconfigure.config_changes(self._table, run)

    # ---- the read view and queries -------------------------------------------------------------
    def view(self, since: float | None = None) -> AggregatorView:
        """A frozen copy of every run and counter; never waits for a run's detectors.

        ``since`` (a Unix time) bounds the cleared findings each run carries: those cleared at or after it.
        """
        return take_view(self._table, since)

    def run_view(self, run: str, since: float | None = None) -> RunView:
        """One run's view; raises ``KeyError`` for an unknown run."""
        return run_view(self._table, run, since)

    def runs(self) -> list[dict[str, Any]]:
        """One summary row per run."""
        return [r.row() for r in self.view().runs]

    def findings(self, run: str, since_step: int = 0, active_only: bool = False) -> list[Finding]:
        """Copies of the findings of ``run`` first raised at or after ``since_step``, oldest first."""
        r = self._table.get_locked(run)
        with r.lock:
            recs = [copy.copy(rec) for rec in r.log if rec.first_step >= since_step]
        return [rec.copy() for rec in recs if rec.active or not active_only]

    def active_findings(self, run: str) -> list[Finding]:
        """Copies of the active findings of ``run``, most severe first."""
        return list(self.run_view(run).active)

    def latest(self, run: str) -> StepStats | None:
        r = self._table.get_locked(run)
        with r.lock:
            return r.history[-1] if r.history else None

    def history(self, run: str) -> list[StepStats]:
        r = self._table.get_locked(run)
        with r.lock:
            return list(r.history)

    def should_stop(self, run: str) -> str | None:
        """Why ``run`` should stop (a detector with ``stop_run`` fired), or ``None``."""
        with self._table.lock:
            r = self._table.runs.get(run)
            return None if r is None else r.stop_reason

    def counters(self) -> dict[str, Any]:
        v = self.view()
        return {"accepted": v.accepted, "rejected": dict(v.rejected), "layer_stats_merged": v.layer_stats_merged,
                "runs": len(v.runs)}

    @property
    def accepted(self) -> int:
        """Messages taken so far."""
        return self._table.accepted

    # ---- snapshots ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Detector state, findings and layouts of every run (not the step history): enough to resume; see
        :func:`gfservice.service.snapshot.state_dict`."""
        return snapshot.state_dict(self._table)

    def load_state_dict(self, state: Mapping[str, Any] | SnapshotState) -> None:
        """Take a saved state (validated as a :class:`~gfservice.saved.SnapshotState` first: pydantic's
        ``ValidationError`` when it is not one, and nothing is taken)."""
        snapshot.load_state_dict(self._table, state)
