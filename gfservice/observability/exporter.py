"""Prometheus export: a custom Collector that reads the aggregator's state at scrape time.

No metric objects are updated on the ingest path: every scrape takes a consistent snapshot of the
aggregator under its lock and builds the ``gradflow_*`` families from it. Cardinality is bounded
whatever the model size: gradient flow across depth goes out as ``depth_buckets`` contiguous buckets,
per-layer series only for at most ``max_layer_series`` layers, and rank-level detail only inside the
``ranks`` label of findings.

>>> from prometheus_client import CollectorRegistry, generate_latest
>>> from gfservice.service.aggregator import Aggregator
>>> from gfservice.wire import Layout
>>> agg = Aggregator()
>>> _ = agg.submit(Layout(run="r1", rank=0, world_size=1, layers=["w", "b"], numel=[4, 1], sharded=[False] * 2))
>>> _ = agg.submit({"kind": "step", "run": "r1", "rank": 0, "step": 0, "count": [4, 1], "sum_sq": [4.0, 0.0],
...                 "max_abs": [1.0, 0.0], "nonfinite": [0, 0]})
>>> reg = CollectorRegistry(auto_describe=False)
>>> reg.register(GradflowCollector(agg))
>>> text = generate_latest(reg).decode()
>>> [ln for ln in text.splitlines() if ln.startswith(("gradflow_grad_norm", "gradflow_last_step{"))]
['gradflow_grad_norm{run="r1"} 2.0', 'gradflow_last_step{run="r1"} 0.0']
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.utils import floatToGoString

from gfservice._version import __version__
from gfservice.api import describe_layers
from gfservice.config import ExporterConfig
from gfservice.observability.metrics_server import MetricsServer, tls_context
from gfservice.service.view import AggregatorView, RunView, ViewSource
from gfservice.stats import depth_buckets, noise_scale
from gfservice.wire import RejectReason

__all__ = ["ExporterConfig", "GradflowCollector", "format_ranks", "layer_selection", "serve_metrics"]

#: Rejection reasons the aggregator knows; exported at 0 from the start so that ``increase()`` sees the first one.
KNOWN_REJECTIONS = tuple(r.value for r in RejectReason)
#: Longest ``layers``/``ranks`` label value.
LABEL_LIMIT = 200

log = logging.getLogger(__name__)


def layer_selection(n_layers: int, cap: int, wanted: Sequence[int] = ()) -> list[int]:
    """Indices of the layers that get their own series: ``wanted`` ones first, then evenly spaced
    across depth (always the first and the last), at most ``cap`` in all, in depth order.

    >>> layer_selection(10, 4)
    [0, 3, 6, 9]
    >>> layer_selection(100, 4, wanted=[50])
    [0, 33, 50, 99]
    >>> len(layer_selection(10_000, 32, wanted=range(5000)))
    32
    """
    if n_layers <= cap:
        return list(range(n_layers))
    if not wanted:  # the common case (no active finding names layers): the same for every run of this size
        return list(_evenly_spaced(n_layers, cap))
    return _selection(n_layers, cap, wanted)


@functools.lru_cache(maxsize=64)
def _evenly_spaced(n_layers: int, cap: int) -> tuple[int, ...]:
    return tuple(_selection(n_layers, cap, ()))


def _selection(n_layers: int, cap: int, wanted: Sequence[int]) -> list[int]:
    ends = {0, n_layers - 1}
    picked = set(ends)
    for i in wanted:
        if len(picked) >= cap:
            break
        if 0 <= i < n_layers:
            picked.add(int(i))
    points = cap
    while len(picked) < cap:  # evenly spaced; a denser grid where rounding or `wanted` took some points
        for i in np.round(np.linspace(0, n_layers - 1, points)).astype(int):
            if len(picked) >= cap:
                break
            picked.add(int(i))
        points *= 2
    return sorted(picked)


def format_ranks(ranks: Sequence[int], limit: int = LABEL_LIMIT) -> str:
    """The ``ranks`` label: ``"1,3"``; runs of consecutive ranks as ranges when the list would be long.

    >>> format_ranks([1, 3]), format_ranks([])
    ('1,3', '')
    >>> format_ranks(range(1000))
    '0-999'
    >>> format_ranks(range(0, 2000, 2))[-24:]
    '114,116,... (1000 ranks)'
    """
    ranks = sorted(set(int(r) for r in ranks))
    plain = ",".join(map(str, ranks))
    if len(plain) <= limit:
        return plain
    parts: list[str] = []
    start = prev = ranks[0]
    for r in [*ranks[1:], None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if r is not None:
            start = prev = r
    text = ",".join(parts)
    if len(text) <= limit:
        return text
    suffix = f",... ({len(ranks)} ranks)"
    return text[: limit - len(suffix)].rsplit(",", 1)[0] + suffix


class GradflowCollector:
    """Builds the ``gradflow_*`` metrics from a :class:`~gfservice.service.view.ViewSource` at scrape time.

    ``clock`` (seconds, like :func:`time.time`) drives the finding linger; tests pass their own.
    ``service_health``, when given, is called at each scrape for the service's snapshot health
    (``{"last_success": unix time or None, "failures": count}``).
    A finding is one series labelled as it was first raised (its ``layers`` and ``ranks`` stay put while it
    is active, so the alert it drives keeps its identity), with the severity it has now.

    Each run is formatted on its own: a run whose series cannot be built (any exception) is left out of that
    scrape, counted in ``gradflow_export_errors_total{reason="run"}`` and logged (at most one line every
    ``LOG_EVERY_S``), and every other run stays. Label values are made valid (unpaired surrogates and control
    characters replaced) and cut to ``label_value_limit`` bytes; should two series end up with one label set,
    one is kept (the more severe finding, else the more recently updated run) and the other counted
    (``reason="duplicate_series"``). Values never raise: an integer too large for a float exports as ``+Inf``.
    That counter is the collector's only state.
    """

    def __init__(self, aggregator: ViewSource, config: ExporterConfig | None = None,
                 clock: Callable[[], float] = time.time, version: str | None = None,
                 service_health: Callable[[], Mapping[str, float | None]] | None = None):
        self.aggregator = aggregator
        self.service_health = service_health
        self.config = config or ExporterConfig()
        self.clock = clock
        self.version: str = version or __version__
        self._errors = dict.fromkeys(EXPORT_ERRORS, 0)
        self._errors_lock = threading.Lock()
        self._log = _RateLimitedLog(LOG_EVERY_S)
        self._cache: dict[str, _RunEntry] = {}  # run name -> its samples and lines as of its last change
        self._cache_lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: the families depend on the runs at scrape time

    @property
    def export_errors(self) -> dict[str, int]:
        """``gradflow_export_errors_total`` so far, by reason."""
        with self._errors_lock:
            return dict(self._errors)

    def _count(self, reason: str, n: int = 1) -> None:
        with self._errors_lock:
            self._errors[reason] += n

    # ---- collect ----------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        entries, tail = self._gather()
        out = _Samples(self.config.label_value_limit)
        for e in entries:
            out.merge(e.samples, e.age)
        out.merge(tail, math.inf)
        yield from self._with_errors(out, out.duplicates).families()

    def exposition(self, openmetrics: bool = False) -> bytes:
        """What ``generate_latest`` of this collector's registry gives (OpenMetrics' with ``openmetrics``), byte for
        byte, in a fraction of its time: each run's lines are formatted once per change of the run and kept (see
        :class:`_RunEntry`), and a scrape joins them. ``serve_metrics`` answers with it.

        >>> from gfservice.service.aggregator import Aggregator
        >>> from prometheus_client import CollectorRegistry, generate_latest
        >>> c = GradflowCollector(Aggregator(), clock=lambda: 0.0)
        >>> reg = CollectorRegistry(auto_describe=False); reg.register(c)
        >>> c.exposition() == generate_latest(reg)
        True
        """
        entries, tail = self._gather()
        if len({e.label for e in entries}) < len(entries):  # two runs cleaned or cut to one run label: merge
            out = _Samples(self.config.label_value_limit)   # them as collect() does (the rare, slow way)
            for e in entries:
                out.merge(e.samples, e.age)
            out.merge(tail, math.inf)
            chunks = [_lines(self._with_errors(out, out.duplicates))]
        else:
            dups = sum(e.samples.duplicates for e in entries) + tail.duplicates
            memo: dict[tuple[str, str], str] = {}
            chunks = [*(e.lines(memo) for e in entries), _lines(self._with_errors(tail, dups))]
        return _encode(chunks, openmetrics)

    def _gather(self) -> tuple[list[_RunEntry], _Samples]:
        """Every run's samples (kept from the last scrape while the run did not change) and the service-wide ones.

        One frozen view, copied under the aggregator's lock; everything here formats it without the lock.
        """
        limit = self.config.label_value_limit
        cleaned: dict[str, str] = {}
        tail = _Samples(limit, cleaned)
        entries: list[_RunEntry] = []
        try:
            snap = self.aggregator.view(since=self.clock() - self.config.finding_linger_s)
        except Exception as exc:  # nothing to export but the collector's own health
            self._count("service")
            self._log.error("the aggregator's view", exc)
            snap = None
        if snap is not None:
            with self._cache_lock:
                cache, self._cache = self._cache, {}  # runs gone from the view leave the cache
            for run in snap.runs:
                try:
                    entry = cache.get(run.name)
                    if entry is None or not entry.fits(run):
                        entry = self._entry(run, cleaned)
                except Exception as exc:
                    self._count("run")
                    self._log.error(f"run {run.name[:100]!r}", exc)
                    continue
                entries.append(entry)
            with self._cache_lock:
                self._cache.update({e.name: e for e in entries})
            staged = _Samples(limit, cleaned)
            try:
                self._format_service(snap, staged)
            except Exception as exc:
                self._count("service")
                self._log.error("the service-wide series", exc)
            else:
                tail.merge(staged, math.inf)
        if self.service_health is not None:
            try:
                _snapshot_samples(self.service_health(), tail)
            except Exception as exc:
                self._count("service")
                self._log.error("the snapshot health", exc)
        tail.add("build_info", [self.version], 1)
        return entries, tail

    def _entry(self, run: RunView, cleaned: dict[str, str]) -> _RunEntry:
        staged = _Samples(self.config.label_value_limit, cleaned)
        with np.errstate(all="ignore"):
            self._format_run(run, staged)
        return _RunEntry(run, staged, staged._label(run.name))

    def _with_errors(self, out: _Samples, duplicates: int) -> _Samples:
        """``out`` with ``gradflow_export_errors_total`` added, once this scrape's ``duplicates`` are counted."""
        if duplicates:
            self._count("duplicate_series", duplicates)
        for reason, n in self.export_errors.items():
            out.add("export_errors", [reason], n)
        return out

    def _format_run(self, run: RunView, out: _Samples) -> None:
        name = run.name
        st = run.latest
        buckets = self.config.depth_buckets
        width = max(2, len(str(buckets - 1)))
        if st is not None:
            grads = st.grads
            out.add("grad_norm", [name], st.global_norm)
            for key, v in (("loss", st.loss), ("learning_rate", st.lr), ("loss_scale", st.loss_scale)):
                if v is not None:
                    out.add(key, [name], v)
            for reason, n in sorted((st.guard_skips or {}).items()):
                out.add("steps_skipped", [name, reason], n)
            if st.rank_norm is not None:  # DDP: each rank's local (pre-allreduce) norm, scaled by a GradScaler
                scale = np.float64(st.loss_scale or 1.0)
                local_sq = np.asarray(st.rank_norm, dtype=np.float64) ** 2 / scale**2
                b_simple = noise_scale(local_sq, np.float64(st.global_norm) ** 2)[0]
                if np.isfinite(b_simple):
                    out.add("noise_scale", [name], b_simple)
            bad = (grads.nonfinite > 0) | ~np.isfinite(grads.sum_sq)
            out.add("nonfinite_layers", [name], np.count_nonzero(bad))
            depth = [(f"{b:0{width}d}", v) for b, v in enumerate(depth_buckets(grads.sum_sq, grads.count, buckets))
                     if v is not None]
            out.add_pairs("depth_grad_rms", name, depth)
            index = {n: i for i, n in enumerate(grads.layers)} if run.active else {}
            wanted = [index[n] for f in run.active for n in f.layers if n in index]
            norms = grads.norm
            picked = layer_selection(len(grads.layers), self.config.max_layer_series, wanted)
            out.add_pairs("layer_grad_norm", name, [(grads.layers[i], norms[i]) for i in picked])
        if run.last_step >= 0:
            out.add("last_step", [name], run.last_step)
            out.add("last_step_timestamp_seconds", [name], run.last_time)
        out.add("run_finished", [name], 1.0 if run.finished else 0.0)
        out.add("run_world_size", [name], run.world_size)
        out.add("run_attempt", [name], run.attempts)
        out.add("stalled_ranks", [name], run.stalled_ranks)
        out.add("reports_dropped", [name], run.sender_dropped)
        out.add("monitor_errors", [name], run.monitor_errors)
        out.add("run_memory_bytes", [name], run.memory_bytes)
        for reason, n in sorted(run.rejected.items()):
            out.add("run_messages_rejected", [name, reason], n)
        for det, why in sorted(run.disabled_detectors.items()):
            out.add("detector_disabled", [name, det, why], 1)
        counts: dict[tuple[str, str], int] = dict.fromkeys(run.findings_total, 0)
        for f in run.active:
            k = (f.detector, f.severity.value)
            counts[k] = counts.get(k, 0) + 1
        for (det, sev), n in sorted(run.findings_total.items()):
            out.add("findings", [name, det, sev], n)
        for (det, sev), n in sorted(counts.items()):
            out.add("active_findings", [name, det, sev], n)
        for labels, (first_step, rank) in _finding_series(run).items():
            out.add("finding", list(labels), first_step, rank)

    def _format_service(self, snap: AggregatorView, out: _Samples) -> None:
        out.add("messages_accepted", [], snap.accepted)
        for reason in sorted({*KNOWN_REJECTIONS, *snap.rejected}):
            out.add("messages_rejected", [reason], snap.rejected.get(reason, 0))
        out.summary("ingest_latency_seconds", snap.ingest_count, snap.ingest_seconds)
        seconds, errors = snap.detector_seconds, snap.detector_errors
        for det in sorted(set(seconds) | set(errors)):
            out.add("detector_seconds", [det], seconds.get(det, 0.0))
            out.add("detector_errors", [det], errors.get(det, 0))
        out.add("runs", [], len(snap.runs))
        for reason in sorted({*KNOWN_EVICTIONS, *snap.evicted}):
            out.add("runs_evicted", [reason], snap.evicted.get(reason, 0))
        out.add("memory_bytes", [], snap.memory_bytes)
        if snap.memory_limit_bytes > 0:  # absent when unbounded: a ratio against 0 would read as +Inf
            out.add("memory_limit_bytes", [], snap.memory_limit_bytes)


#: Every family the collector writes: name (without ``gradflow_`` and ``_total``) -> (type, help, labels),
#: in the order of the exposition.
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "grad_norm": ("gauge", "Global L2 gradient norm of the last merged step.", ("run",)),
    "loss": ("gauge", "Loss of the last merged step.", ("run",)),
    "learning_rate": ("gauge", "Learning rate of the first parameter group at the last merged step.", ("run",)),
    "loss_scale": ("gauge", "GradScaler loss scale at the last merged step.", ("run",)),
    "last_step": ("gauge", "Last merged step.", ("run",)),
    "last_step_timestamp_seconds": ("gauge", "Unix time at which the service merged the last step.", ("run",)),
    "run_finished": ("gauge", "1 once the training job closed its monitors, else 0.", ("run",)),
    "run_world_size": ("gauge", "Ranks (processes) of the run.", ("run",)),
    "run_attempt": ("gauge", "Attempts (starts) of the run so far, 1 for the first: one more each time the training "
                    "job restarts under the same run name.", ("run",)),
    "steps_skipped": ("counter", "Steps whose optimizer update the monitor's guard skipped so far (guard mode), by "
                      "reason; only for runs with the guard on.", ("run", "reason")),
    "nonfinite_layers": ("gauge", "Layers with NaN/Inf gradient values in the last merged step.", ("run",)),
    "stalled_ranks": ("gauge", "Ranks missing from the last merged step (no report within the merge timeout).",
                      ("run",)),
    "noise_scale": ("gauge", "Gradient noise scale B_simple = tr(Sigma)/|G|^2 of the last merged step, in per-rank "
                    "batches (McCandlish et al. 2018): one step's two-batch estimate from the DDP ranks' local norms, "
                    "noisy; only for runs with 2+ ranks reporting local norms.", ("run",)),
    "depth_grad_rms": ("gauge", "RMS gradient of contiguous depth buckets, 00 = input side.", ("run", "bucket")),
    "layer_grad_norm": ("gauge", "L2 gradient norm of a capped, evenly spaced set of layers and of the layers "
                        "named in active findings.", ("run", "layer")),
    "findings": ("counter", "Findings raised.", ("run", "detector", "severity")),
    "active_findings": ("gauge", "Findings active now.", ("run", "detector", "severity")),
    "finding": ("gauge", "One series per active finding (and per finding cleared less than finding_linger_s ago); "
                "the value is the step at which it was first raised.",
                ("run", "detector", "severity", "key", "layers", "ranks")),
    "reports_dropped": ("counter", "Reports the run's senders dropped before they reached the service.", ("run",)),
    "monitor_errors": ("counter", "Errors the run's monitors caught in the training processes and kept from the "
                       "training loop (the sum of the ranks' monitor.errors).", ("run",)),
    "run_memory_bytes": ("gauge", "Bytes the run holds in the service (history, pending steps, detector state).",
                         ("run",)),
    "run_messages_rejected": ("counter", "Messages of the run the aggregator refused, by reason (reasons seen so "
                              "far only; gradflow_messages_rejected_total has every reason).", ("run", "reason")),
    "detector_disabled": ("gauge", "1 for each detector switched off for the run, by why (errors: past its error "
                          "budget; time: past its time budget).", ("run", "detector", "reason")),
    "messages_accepted": ("counter", "Messages the aggregator took.", ()),
    "messages_rejected": ("counter", "Messages the aggregator refused, by reason.", ("reason",)),
    "ingest_latency_seconds": ("summary", "Time the aggregator spent on a message.", ()),
    "detector_seconds": ("counter", "Time spent in each detector, all runs.", ("detector",)),
    "detector_errors": ("counter", "Exceptions raised by each detector, all runs.", ("detector",)),
    "runs": ("gauge", "Runs the service tracks.", ()),
    "runs_evicted": ("counter", "Runs the service forgot to stay within its limits, or retired, by reason.",
                     ("reason",)),
    "memory_bytes": ("gauge", "Bytes all runs hold in the service, as the aggregator accounts them.", ()),
    "memory_limit_bytes": ("gauge", "The aggregator's memory budget (max_memory_bytes); absent when unbounded.", ()),
    "build_info": ("gauge", "gfservice version (always 1).", ("version",)),
    "snapshot_failures": ("counter", "Snapshot writes of the service that failed (submits are taken regardless; the "
                          "state is not durable meanwhile).", ()),
    "snapshot_last_success_timestamp_seconds": ("gauge", "Unix time of the service's last successful snapshot "
                                                "write.", ()),
    "export_errors": ("counter", "Series the exporter could not build and left out of a scrape, per scrape, by reason "
                      "(run: one run's series; service: service-wide series; duplicate_series: a label set that "
                      "appeared twice, e.g. after label values were cut to length).", ("reason",)),
}

#: Reasons of ``gradflow_export_errors_total``.
EXPORT_ERRORS = ("run", "service", "duplicate_series")
#: Eviction reasons exported at 0 from the start (others appear when the aggregator reports them).
KNOWN_EVICTIONS = ("finished_ttl", "max_runs", "memory")
#: At most one log line per this many seconds for export failures (with a count of those not logged).
LOG_EVERY_S = 60.0
_MAX_INT_FLOAT = 2.0**1023


def _number(v: Any) -> float:
    """A sample value as a float, whatever its size: integers beyond the float range become +-Inf.

    >>> _number(10**400), _number(-10**400), _number(np.int64(3)), _number(True)
    (inf, -inf, 3.0, 1.0)
    """
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def clean_label(value: str, limit: int) -> str:
    """A label value that always encodes: unpaired surrogates and control characters become U+FFFD, and a value
    longer than ``limit`` UTF-8 bytes is cut to ``limit`` bytes, ending in ``...`` and 8 hex digits of a hash of
    the whole value (so that cut values stay distinct).

    >>> clean_label("a\\ud800b\\x00c", 64) == "a\\ufffdb\\ufffdc"
    True
    >>> cut = clean_label("x" * 300, 64)
    >>> len(cut.encode()), cut[-11:]
    (64, '...b12499e1')
    >>> clean_label("x" * 300, 64) != clean_label("x" * 299 + "y", 64)
    True
    """
    value = str(value)
    if _BAD_CHARS.search(value):
        value = _BAD_CHARS.sub("\ufffd", value)
    raw = value.encode("utf-8")
    if len(raw) <= limit:
        return value
    digest = hashlib.blake2b(raw, digest_size=4).hexdigest()
    return raw[: limit - 11].decode("utf-8", "ignore") + "..." + digest


_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class _Samples:
    """The samples of one scrape (or one run's share of it), one per family and label set."""

    def __init__(self, limit: int, cleaned: dict[str, str] | None = None):
        self.limit = limit
        self.samples: dict[str, dict[tuple[str, ...], tuple[float, float, float]]] = {}
        self.summaries: dict[str, tuple[float, float]] = {}
        self.duplicates = 0
        self._clean: dict[str, str] = {} if cleaned is None else cleaned  # raw label value -> clean, shared

    def add(self, family: str, labels: Sequence[Any], value: Any, rank: float = 0.0, age: float = 0.0) -> None:
        """Add a sample; of two with one label set the one with the higher ``(rank, age)`` stays (the later on a
        tie) and the other is counted in ``duplicates``."""
        clean = self._clean
        key = tuple([clean.get(v) or self._label(v) for v in labels])  # the memo first: most values repeat
        if len(key) != len(FAMILIES[family][2]):
            raise ValueError(f"gradflow_{family}: {len(key)} label values for {FAMILIES[family][2]}")
        self._put(family, key, _number(value), rank, age)

    def add_pairs(self, family: str, first: str, pairs: Sequence[tuple[str, Any]]) -> None:
        """``add(family, [first, second], value)`` for each ``(second, value)`` of ``pairs``, in one loop (the
        per-bucket and per-layer series of a run)."""
        if len(FAMILIES[family][2]) != 2:
            raise ValueError(f"gradflow_{family}: 2 label values for {FAMILIES[family][2]}")
        head, clean = self._label(first), self._clean
        for second, value in pairs:
            self._put(family, (head, clean.get(second) or self._label(second)), _number(value), 0.0, 0.0)

    def _put(self, family: str, key: tuple[str, ...], value: float, rank: float, age: float) -> None:
        series = self.samples.setdefault(family, {})
        old = series.get(key)
        if old is not None:
            self.duplicates += 1
            if (old[1], old[2]) > (rank, age):
                return
        series[key] = (value, rank, age)

    def summary(self, family: str, count: Any, total: Any) -> None:
        self.summaries[family] = (_number(count), _number(total))

    def merge(self, other: _Samples, age: float) -> None:
        """Take ``other``'s samples (one run's), aged ``age`` (the run's last update) against those already here."""
        for family, series in other.samples.items():
            for key, (value, rank, _age) in series.items():
                self._put(family, key, value, rank, age)
        self.summaries.update(other.summaries)
        self.duplicates += other.duplicates

    def _label(self, value: Any) -> str:
        text = value if isinstance(value, str) else str(value)
        clean = self._clean.get(text)
        if clean is None:
            clean = self._clean[text] = clean_label(text, self.limit)
        return clean

    def families(self) -> Iterator[Metric]:
        kinds: dict[str, type[GaugeMetricFamily] | type[CounterMetricFamily]] = {
            "gauge": GaugeMetricFamily, "counter": CounterMetricFamily}
        for name, (kind, doc, labels) in FAMILIES.items():
            if kind == "summary":
                if name in self.summaries:
                    count, total = self.summaries[name]
                    yield SummaryMetricFamily(f"gradflow_{name}", doc, count_value=count,  # type: ignore[arg-type]
                                              sum_value=total)
                continue
            series = self.samples.get(name)
            if series is None and name in _OPTIONAL:
                continue
            family = kinds[kind](f"gradflow_{name}", doc, labels=list(labels))
            for key, (value, _rank, _age) in (series or {}).items():
                family.add_metric(list(key), value)
            yield family


#: Families left out of the exposition when they have no samples (the others always show their HELP and TYPE).
_OPTIONAL = frozenset({"snapshot_failures", "snapshot_last_success_timestamp_seconds", "memory_limit_bytes"})


def _finding_state(f: Any) -> tuple[Any, ...]:
    return (f.detector, f.severity, f.key, f.since, f.active, tuple(f.layers), tuple(f.ranks))


def _run_state(run: RunView) -> tuple[Any, ...]:
    """Everything of ``run`` its series are made of but its last merged step (compared by identity)."""
    return (run.last_step, run.last_time, run.finished, run.world_size, run.attempts, run.sender_dropped,
            run.memory_bytes, tuple(sorted(run.rejected.items())), tuple(sorted(run.disabled_detectors.items())),
            tuple(sorted(run.findings_total.items())), tuple(map(_finding_state, run.active)),
            tuple(map(_finding_state, run.recently_cleared)))


class _RunEntry:
    """One run's samples and their exposition lines, kept while the run stays as it was: same last merged step
    (the very object: merged steps are never changed once merged) and same :func:`_run_state`."""

    __slots__ = ("_lines", "age", "label", "latest", "name", "samples", "state")

    def __init__(self, run: RunView, samples: _Samples, label: str):
        self.name, self.latest, self.state = run.name, run.latest, _run_state(run)
        self.age = _number(run.last_time)
        self.samples, self.label = samples, label
        self._lines: dict[str, str] | None = None

    def fits(self, run: RunView) -> bool:
        return run.latest is self.latest and _run_state(run) == self.state

    def lines(self, memo: dict[tuple[str, str], str]) -> dict[str, str]:
        if self._lines is None:
            self._lines = _lines(self.samples, memo)
        return self._lines


def _escape_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


#: Per family: the sample name and the label names in exposition order (sorted, as prometheus_client writes them).
_SAMPLE_NAMES = {name: f"gradflow_{name}" + ("_total" if kind == "counter" else "") for name, (kind, _, _) in
                 FAMILIES.items()}
_LABEL_ORDER = {name: sorted(range(len(labels)), key=labels.__getitem__) for name, (_, _, labels) in FAMILIES.items()}


def _lines(samples: _Samples, memo: dict[tuple[str, str], str] | None = None) -> dict[str, str]:
    """The exposition lines of ``samples``, per family (the same in the text format and in OpenMetrics);
    ``memo`` keeps each ``label="escaped value"`` made, for the next run of the same scrape."""
    memo = {} if memo is None else memo
    out: dict[str, str] = {}
    for family, series in samples.samples.items():
        sample, labels, order = _SAMPLE_NAMES[family], FAMILIES[family][2], _LABEL_ORDER[family]
        parts = []
        for key, (value, _rank, _age) in series.items():
            if key:
                pairs = []
                for i in order:
                    pair = memo.get((labels[i], key[i]))
                    if pair is None:
                        pair = memo[labels[i], key[i]] = f'{labels[i]}="{_escape_value(key[i])}"'
                    pairs.append(pair)
                parts.append(f"{sample}{{{','.join(pairs)}}} {floatToGoString(value)}\n")
            else:
                parts.append(f"{sample} {floatToGoString(value)}\n")
        out[family] = "".join(parts)
    for family, (count, total) in samples.summaries.items():
        out[family] = (f"gradflow_{family}_count {floatToGoString(count)}\n"
                       f"gradflow_{family}_sum {floatToGoString(total)}\n")
    return out


def _encode(chunks: Sequence[Mapping[str, str]], openmetrics: bool) -> bytes:
    """The exposition of the families whose lines ``chunks`` hold, in :data:`FAMILIES` order, as
    ``generate_latest`` (or OpenMetrics') would write them."""
    out: list[str] = []
    for name, (kind, doc, _labels) in FAMILIES.items():
        parts = [c[name] for c in chunks if name in c]
        if not parts and (kind == "summary" or name in _OPTIONAL):
            continue
        if openmetrics:
            head = f"gradflow_{name}"
            doc = doc.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
        else:
            head = _SAMPLE_NAMES[name]
            doc = doc.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {head} {doc}\n# TYPE {head} {kind}\n")
        out += parts
    if openmetrics:
        out.append("# EOF\n")
    return "".join(out).encode("utf-8")


class _RateLimitedLog:
    """Logs at most one error every ``every_s`` seconds, with the number of those left out since."""

    def __init__(self, every_s: float):
        self.every_s = every_s
        self._last = -math.inf
        self._skipped = 0
        self._lock = threading.Lock()

    def error(self, what: str, exc: BaseException) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.every_s:
                self._skipped += 1
                return
            self._last, skipped, self._skipped = now, self._skipped, 0
        more = f" ({skipped} more export failures since the last message)" if skipped else ""
        log.error("gfservice exporter: %s left out of the scrape: %s: %s%s", what, type(exc).__name__, exc, more,
                  exc_info=exc)


def _snapshot_samples(health: Mapping[str, float | None], out: _Samples) -> None:
    out.add("snapshot_failures", [], health.get("failures") or 0.0)
    last = health.get("last_success")
    if last is not None:  # absent until the first snapshot is written
        out.add("snapshot_last_success_timestamp_seconds", [], last)


def _finding_series(run: RunView) -> dict[tuple[str, ...], tuple[float, float]]:
    """One ``gradflow_finding`` series per finding, active or recently cleared, labelled as first raised (its
    layers and ranks stay put while it is active, so the alert it drives keeps its identity) with the severity
    it has now: label set -> (the step at which it was first raised, its rank: active and more severe is higher).
    A finding that fired again with the same labels shows once, as its newest occurrence (Prometheus would drop
    duplicate series).
    """
    series: dict[tuple[str, ...], tuple[float, float]] = {}
    for f in [*run.recently_cleared, *run.active]:  # active last: they win over a cleared twin
        labels = (run.name, f.detector, f.severity.value, f.key, _describe(f.layers), format_ranks(f.ranks))
        series[labels] = (_number(f.since), (10.0 if f.active else 0.0) + f.severity.rank)
    return series


def _describe(layers: Sequence[str]) -> str:
    if not layers:
        return ""
    text = describe_layers(layers)
    return text if len(text) <= LABEL_LIMIT else text[: LABEL_LIMIT - 3] + "..."


class _GradflowRegistry(CollectorRegistry):
    """A registry of one :class:`GradflowCollector` that the metrics server asks for its exposition directly
    (:meth:`GradflowCollector.exposition`: the same bytes as ``generate_latest``, faster)."""

    def __init__(self, collector: GradflowCollector):
        super().__init__(auto_describe=False)
        self.register(collector)
        self.collector = collector

    def exposition(self, content_type: str) -> bytes:
        return self.collector.exposition(openmetrics=content_type.startswith("application/openmetrics-text"))


def serve_metrics(aggregator: ViewSource, config: ExporterConfig | None = None,
                  **collector_options: Any) -> tuple[Any, threading.Thread, int]:
    """Serve ``/metrics`` for ``aggregator`` on its own registry; returns ``(server, thread, port)``.

    Bound to 127.0.0.1 unless ``config.address`` says otherwise; HTTPS when ``config.certfile`` is set (mutual
    TLS with ``client_cafile``). No client can stall it (see :mod:`gfservice.observability.metrics_server`).
    Stop it with ``server.shutdown(); server.server_close()``.

    >>> import urllib.request
    >>> from gfservice.service.aggregator import Aggregator
    >>> server, thread, port = serve_metrics(Aggregator())
    >>> body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    >>> "gradflow_build_info" in body
    True
    >>> server.shutdown(); server.server_close()
    """
    config = config or ExporterConfig()
    registry = _GradflowRegistry(GradflowCollector(aggregator, config, **collector_options))
    context = None
    if config.certfile and config.keyfile:
        context = tls_context(config.certfile, config.keyfile, config.client_cafile)
    server = MetricsServer(registry, config.address, config.port, ssl_context=context,
                           timeout_s=config.connection_timeout_s, max_threads=config.max_threads,
                           max_connections=config.max_connections)
    thread = server.start()
    return server, thread, server.server_port
