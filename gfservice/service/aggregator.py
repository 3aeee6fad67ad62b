"""The aggregator core (plain Python, no Ray): validate messages, merge ranks into steps, run detectors,
keep findings with their lifecycle and a bounded history per run.

>>> from gfservice.wire import Layout, RunEnd, StepReport
>>> agg = Aggregator()
>>> agg.submit(Layout(run="r", rank=0, world_size=1, layers=["w"], numel=[4], sharded=[False]))
Ack(accepted=True, reason='', new_findings=())
>>> ack = agg.submit({"run": "r", "rank": 0, "step": 0, "count": [4], "sum_sq": [float("nan")],
...                   "max_abs": [float("nan")], "nonfinite": [4]})
>>> [f.detector for f in ack.new_findings]
['nonfinite']
>>> agg.submit({"run": "nope", "rank": 0, "step": 0}).reason
'unknown_run'
>>> agg.rejected
{'unknown_run': 1}
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gfservice import registry
from gfservice.api import Detector, Finding, Severity, StepStats
from gfservice.stats import merge_shards
from gfservice.wire import Layout, RunEnd, StepReport

log = logging.getLogger(__name__)


class AggregatorConfig(BaseModel):
    """Limits and behaviour of the aggregator; every field has a default that suits most jobs."""

    model_config = ConfigDict(extra="forbid")

    #: Merged steps kept per run (the history behind ``latest`` and reports).
    history: int = Field(1000, ge=1)
    #: Findings kept per run, newest last.
    findings_history: int = Field(1000, ge=1)
    #: Layers allowed per run; a layout with more is rejected as oversized.
    max_layers: int = Field(100_000, ge=1)
    #: Runs tracked at once; the least recently updated run is forgotten beyond this.
    max_runs: int = Field(1000, ge=1)
    #: A step waits this long for its missing ranks before it is merged without them.
    merge_timeout_s: float = Field(30.0, gt=0)
    #: Hard cap on steps waiting for ranks: beyond it the oldest is merged without its missing ranks.
    #: (A step is merged as soon as every missing rank has reported a later step: their report is lost.)
    max_pending_steps: int = Field(256, ge=1)
    #: A run with no new step for this long is taken as over (its job died without closing its monitor),
    #: which ends its "training stalled" alert.
    idle_finish_s: float = Field(6 * 3600.0, gt=0)


class Rejected(ValueError):
    """A message the aggregator will not take, with a short machine-readable ``reason``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Ack(NamedTuple):
    """Answer to one submitted message."""

    accepted: bool
    reason: str = ""
    new_findings: tuple[Finding, ...] = ()


@dataclass
class RunState:
    """Everything the aggregator knows of one run."""

    name: str
    world_size: int
    detectors: dict[str, Detector]
    layouts: dict[int, Layout] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    sharded: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    pending: dict[int, dict[int, StepReport]] = field(default_factory=dict)
    pending_since: dict[int, float] = field(default_factory=dict)
    history: deque[StepStats] = field(default_factory=deque)
    active: dict[tuple[str, str], Finding] = field(default_factory=dict)
    log: deque[Finding] = field(default_factory=deque)
    last_step: int = -1
    last_time: float = 0.0
    #: Findings raised so far, by (detector, severity).
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


class Aggregator:
    """Merges reports of many runs and ranks and runs the detectors; thread-safe.

    ``detector_settings`` maps detector names to field overrides (see :mod:`gfservice.registry`);
    ``detector_factory`` replaces the registry entirely (tests, embedding).
    """

    def __init__(
        self,
        config: AggregatorConfig | None = None,
        detector_settings: Mapping[str, Mapping[str, Any]] | None = None,
        detector_factory: Callable[[], dict[str, Detector]] | None = None,
    ):
        self.config = config or AggregatorConfig()
        settings = registry.validate(detector_settings)
        self._factory = detector_factory or (lambda: registry.build(settings))
        self._runs: dict[str, RunState] = {}
        self._lock = threading.RLock()
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self.layer_stats_merged = 0
        #: Time spent in :meth:`submit` and the number of calls: the ingest latency summary.
        self.ingest_seconds = 0.0
        self.ingest_count = 0

    # ---- ingest ---------------------------------------------------------------------------------
    def submit(self, message: Layout | StepReport | RunEnd | Mapping[str, Any]) -> Ack:
        """Validate and take one message (a model or a plain dict); never raises for bad input."""
        t0 = time.perf_counter()
        try:
            msg = self._parse(message)
            with self._lock:
                new: list[Finding] = []
                if isinstance(msg, Layout):
                    self._register(msg)
                elif isinstance(msg, RunEnd):
                    new = self._end(msg)
                else:
                    new = self._ingest(msg)
                self.accepted += 1
            return Ack(True, "", tuple(new))
        except Rejected as exc:
            with self._lock:
                self.rejected[exc.reason] = self.rejected.get(exc.reason, 0) + 1
            log.debug("rejected message: %s", exc)
            return Ack(False, exc.reason)
        finally:
            self.ingest_seconds += time.perf_counter() - t0
            self.ingest_count += 1

    @staticmethod
    def _parse(message: Any) -> Layout | StepReport | RunEnd:
        if isinstance(message, Layout | StepReport | RunEnd):
            return message
        if not isinstance(message, Mapping):
            raise Rejected("invalid", f"expected a mapping, got {type(message).__name__}")
        if "layers" in message or "world_size" in message:
            cls = Layout
        elif "end" in message:
            cls = RunEnd
        else:
            cls = StepReport
        try:
            return cls.model_validate(message)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            reason = "oversized" if "over the limit" in first["msg"] or "too_long" in first["type"] else "invalid"
            raise Rejected(reason, f"{cls.__name__}.{where}: {first['msg']}") from None

    def _register(self, lay: Layout) -> None:
        if len(lay.layers) > self.config.max_layers:
            raise Rejected("oversized", f"{len(lay.layers)} layers, limit {self.config.max_layers}")
        run = self._runs.get(lay.run)
        if run is None or run.world_size != lay.world_size:
            if run is not None:
                log.info("run %s restarted with world size %d", lay.run, lay.world_size)
            run = self._new_run(lay.run, lay.world_size)
        if lay.reports_layers:
            if run.layers and tuple(lay.layers) != run.layers:
                raise Rejected("layout_mismatch", f"rank {lay.rank} of {lay.run} reports other layers")
            run.layers = tuple(lay.layers)
            run.sharded = np.asarray(lay.sharded, dtype=bool)
        run.layouts[lay.rank] = lay
        run.ended.discard(lay.rank)
        run.finished = False

    def _new_run(self, name: str, world_size: int) -> RunState:
        if name not in self._runs and len(self._runs) >= self.config.max_runs:
            oldest = min(self._runs.values(), key=lambda r: r.last_time)
            log.warning("forgetting run %s: more than %d runs", oldest.name, self.config.max_runs)
            del self._runs[oldest.name]
        run = RunState(
            name=name,
            world_size=world_size,
            detectors=self._factory(),
            history=deque(maxlen=self.config.history),
            log=deque(maxlen=self.config.findings_history),
        )
        self._runs[name] = run
        return run

    def _end(self, msg: RunEnd) -> list[Finding]:
        run = self._runs.get(msg.run)
        if run is None:
            raise Rejected("unknown_run", f"no layout for run {msg.run!r}")
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
            raise Rejected("unknown_run", f"no layout for run {rep.run!r}; send the Layout first")
        lay = run.layouts.get(rep.rank)
        if lay is None:
            raise Rejected("unknown_rank", f"rank {rep.rank} of {rep.run} sent no layout")
        expected = len(lay.layers) if lay.reports_layers else 0
        if rep.n_layers != expected:
            raise Rejected("shape_mismatch", f"{rep.n_layers} layers, layout has {expected}")
        if rep.step <= run.last_step:
            raise Rejected("stale_step", f"step {rep.step} of {rep.run} is already merged")
        slot = run.pending.setdefault(rep.step, {})
        if rep.rank in slot:
            raise Rejected("duplicate", f"rank {rep.rank} already reported step {rep.step}")
        slot[rep.rank] = rep
        run.rank_last_step[rep.rank] = max(run.rank_last_step.get(rep.rank, -1), rep.step)
        run.pending_since.setdefault(rep.step, time.time())
        return self._merge_ready(run)

    # ---- merging --------------------------------------------------------------------------------
    def _merge_ready(self, run: RunState, force: bool = False) -> list[Finding]:
        new: list[Finding] = []
        now = time.time()
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

    def _merge_step(self, run: RunState, step: int, reports: dict[int, StepReport]) -> list[Finding]:
        layer_reports = [r for rank, r in sorted(reports.items()) if run.layouts[rank].reports_layers]
        if not layer_reports:  # heartbeats only: nothing to judge
            return []
        parts = [r.grad_stats(run.layers) for r in layer_reports]
        grads = merge_shards(parts, run.sharded)
        first = layer_reports[0]
        weight_norm = _merge_norms([r.weight_norm for r in layer_reports], run.sharded)
        update_norm = _merge_norms([r.update_norm for r in layer_reports], run.sharded)
        ws = run.world_size
        rank_norm = np.full(ws, np.nan)
        rank_nonfinite = np.zeros(ws, bool)
        step_time = np.full(ws, np.nan)
        for rank, r in reports.items():
            if r.local_norm is not None:
                rank_norm[rank] = r.local_norm
            rank_nonfinite[rank] = r.local_nonfinite
            if r.step_time is not None:
                step_time[rank] = r.step_time
        stats = StepStats(
            run=run.name,
            step=step,
            grads=grads,
            time=max(r.time for r in reports.values()) or time.time(),
            loss=first.loss,
            lr=first.lr,
            loss_scale=first.loss_scale,
            skipped=any(r.skipped for r in reports.values()),
            weight_norm=weight_norm,
            update_ratio=None if update_norm is None or weight_norm is None else _ratio(update_norm, weight_norm),
            rank_norm=rank_norm if ws > 1 else None,
            rank_nonfinite=rank_nonfinite if ws > 1 else None,
            step_time=step_time,
            missing_ranks=tuple(sorted(set(range(ws)) - set(reports))),
        )
        self.layer_stats_merged += len(grads) * len(layer_reports)
        return self._run_detectors(run, stats)

    def _run_detectors(self, run: RunState, stats: StepStats) -> list[Finding]:
        run.history.append(stats)
        run.last_step = stats.step
        run.last_time = time.time()
        raised: dict[tuple[str, str], Finding] = {}
        silent: set[str] = set()
        for name, det in run.detectors.items():
            t0 = time.perf_counter()
            try:
                found = det.update(stats)
            except Exception:
                run.detector_errors[name] = run.detector_errors.get(name, 0) + 1
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
            prev = run.active.get(ident)
            if prev is not None:  # still active: the finding as first raised, seen again at this step
                prev.last_step = stats.step
                prev.value = f.value
                if Severity(f.severity).rank > Severity(prev.severity).rank:
                    prev.severity = f.severity
                continue
            f.first_step = f.last_step = stats.step
            run.active[ident] = f
            run.log.append(f)
            key = (f.detector, f.severity.value)
            run.findings_total[key] = run.findings_total.get(key, 0) + 1
            new.append(f)
            det = run.detectors.get(f.detector)
            if det is not None and det.config.stop_run and run.stop_reason is None:
                run.stop_reason = f"{f.detector}: {f.message}"
        for ident in [i for i in run.active if i not in raised and i[0] not in silent]:
            run.active.pop(ident).active = False  # the same object as in the log
        return new

    def flush(self, run: str | None = None) -> list[Finding]:
        """Merge every waiting step now (all runs, or one), missing ranks or not."""
        with self._lock:
            runs = [self._runs[run]] if run else list(self._runs.values())
            return [f for r in runs for f in self._merge_ready(r, force=True)]

    def tick(self) -> list[Finding]:
        """Merge the steps whose ranks are overdue and retire long-idle runs; call it periodically."""
        with self._lock:
            now = time.time()
            for r in self._runs.values():
                if not r.finished and r.last_time and now - r.last_time > self.config.idle_finish_s:
                    log.warning("run %s sent nothing for %.0f s: taking it as over", r.name, now - r.last_time)
                    r.finished = True
            return [f for r in list(self._runs.values()) for f in self._merge_ready(r)]

    # ---- queries --------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        """One summary row per run."""
        with self._lock:
            return [
                {
                    "run": r.name,
                    "world_size": r.world_size,
                    "layers": len(r.layers),
                    "last_step": r.last_step,
                    "last_time": r.last_time,
                    "active_findings": len(r.active),
                    "stop_reason": r.stop_reason,
                    "finished": r.finished,
                    "sender_dropped": r.sender_dropped,
                }
                for r in self._runs.values()
            ]

    def run_state(self, run: str) -> RunState:
        with self._lock:
            if run not in self._runs:
                raise KeyError(f"unknown run {run!r}")
            return self._runs[run]

    def findings(self, run: str, since_step: int = 0, active_only: bool = False) -> list[Finding]:
        """Findings of ``run`` first raised at or after ``since_step``, oldest first."""
        with self._lock:
            r = self.run_state(run)
            found = [f for f in r.log if (f.first_step or 0) >= since_step]
            return [f for f in found if f.active] if active_only else found

    def active_findings(self, run: str) -> list[Finding]:
        with self._lock:
            return sorted(self.run_state(run).active.values(), key=lambda f: -Severity(f.severity).rank)

    def latest(self, run: str) -> StepStats | None:
        with self._lock:
            h = self.run_state(run).history
            return h[-1] if h else None

    def history(self, run: str) -> list[StepStats]:
        with self._lock:
            return list(self.run_state(run).history)

    def should_stop(self, run: str) -> str | None:
        """Why ``run`` should stop (a detector with ``stop_run`` fired), or ``None``."""
        with self._lock:
            r = self._runs.get(run)
            return None if r is None else r.stop_reason

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "accepted": self.accepted,
                "rejected": dict(self.rejected),
                "layer_stats_merged": self.layer_stats_merged,
                "runs": len(self._runs),
            }

    # ---- snapshots ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Detector state, findings and layouts of every run (not the step history): enough to resume."""
        with self._lock:
            return {
                "runs": {
                    r.name: {
                        "world_size": r.world_size,
                        "layouts": [lay.model_dump() for lay in r.layouts.values()],
                        "detectors": {n: d.state_dict() for n, d in r.detectors.items()},
                        "active": [f.model_dump() for f in r.active.values()],
                        "log": [f.model_dump() for f in r.log],
                        "last_step": r.last_step,
                        "last_time": r.last_time,
                        "findings_total": dict(r.findings_total),
                        "stop_reason": r.stop_reason,
                        "sender_dropped": r.sender_dropped,
                        "finished": r.finished,
                    }
                    for r in self._runs.values()
                },
                "accepted": self.accepted,
                "rejected": dict(self.rejected),
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            for name, s in state.get("runs", {}).items():
                run = self._new_run(name, s["world_size"])
                for lay in s["layouts"]:
                    self._register(Layout.model_validate(lay))
                for n, d in run.detectors.items():
                    if n in s["detectors"]:
                        d.load_state_dict(s["detectors"][n])
                run.log.extend(Finding.model_validate(f) for f in s["log"])
                by_ident = {(f.detector, f.key, f.first_step): f for f in run.log}
                for f in s["active"]:
                    fnd = Finding.model_validate(f)
                    fnd = by_ident.get((fnd.detector, fnd.key, fnd.first_step), fnd)
                    run.active[fnd.identity] = fnd
                run.last_step = s["last_step"]
                run.last_time = s["last_time"]
                run.findings_total = {tuple(k) if not isinstance(k, tuple) else k: v
                                      for k, v in s["findings_total"].items()}
                run.stop_reason = s["stop_reason"]
                run.sender_dropped = s.get("sender_dropped", 0)
                run.finished = s.get("finished", False)
            self.accepted = state.get("accepted", 0)
            self.rejected = dict(state.get("rejected", {}))


def _merge_norms(parts: list[np.ndarray | None], sharded: np.ndarray) -> np.ndarray | None:
    """Merge per-layer L2 norms of shards (root of summed squares) or take replicated ones once."""
    arrays = [p for p in parts if p is not None and len(p)]
    if len(arrays) != len(parts) or not arrays:
        return arrays[0] if arrays else None
    if len(arrays) == 1:
        return arrays[0]
    summed = np.sqrt(np.sum(np.square(np.stack(arrays)), axis=0))
    return np.where(sharded, summed, arrays[0])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(np.shape(num), np.nan)
    np.divide(num, den, out=out, where=np.asarray(den) > 0)
    return out
