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

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from gfservice.api import describe_layers
from gfservice.config import ExporterConfig
from gfservice.service.aggregator import Aggregator, AggregatorView, RunView
from gfservice.stats import noise_scale
from gfservice.wire import RejectReason

__all__ = ["ExporterConfig", "GradflowCollector", "depth_buckets", "format_ranks", "layer_selection", "serve_metrics"]

#: Rejection reasons the aggregator knows; exported at 0 from the start so that ``increase()`` sees the first one.
KNOWN_REJECTIONS = tuple(r.value for r in RejectReason)
#: Longest ``layers``/``ranks`` label value.
LABEL_LIMIT = 200


def depth_buckets(sum_sq: np.ndarray, count: np.ndarray, buckets: int) -> list[float | None]:
    """RMS gradient of ``buckets`` contiguous depth buckets: ``sqrt(sum sum_sq / sum count)`` per bucket.

    Bucket ``b`` covers layers ``[b*n//B, (b+1)*n//B)``; with fewer layers than buckets each bucket holds
    the one layer at its depth, so the picture keeps its shape. A bucket holding NaN/Inf gradients is NaN or
    Inf; one without elements (no gradients at all) is ``None``.

    >>> depth_buckets(np.array([4.0, 0.0, 9.0, 16.0]), np.array([1, 1, 1, 1]), 2)
    [1.4142135623730951, 3.5355339059327378]
    >>> depth_buckets(np.array([4.0, 9.0]), np.array([1, 1]), 4)
    [2.0, 2.0, 3.0, 3.0]
    >>> depth_buckets(np.array([np.nan, 1.0, 0.0]), np.array([1, 1, 0]), 3)
    [nan, 1.0, None]
    """
    n = len(sum_sq)
    if n == 0:
        return [None] * buckets
    lo = np.arange(buckets) * n // buckets
    hi = np.maximum((np.arange(buckets) + 1) * n // buckets, lo + 1)
    csq = np.concatenate([[0.0], np.cumsum(sum_sq, dtype=np.float64)])
    ccount = np.concatenate([[0], np.cumsum(count, dtype=np.int64)])
    sq = csq[hi] - csq[lo]
    cnt = ccount[hi] - ccount[lo]
    # Non-finite sums poison the cumulative sums past them: recompute those buckets directly.
    if not np.all(np.isfinite(sum_sq)):
        sq = np.array([np.sum(sum_sq[a:b]) for a, b in zip(lo, hi, strict=True)])
    with np.errstate(divide="ignore", invalid="ignore"):
        rms = np.sqrt(sq / np.maximum(cnt, 1))
    return [float(v) if c > 0 else None for v, c in zip(rms, cnt, strict=True)]


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
    """Builds the ``gradflow_*`` metrics from an :class:`~gfservice.service.aggregator.Aggregator` at scrape time.

    ``clock`` (seconds, like :func:`time.time`) drives the finding linger; tests pass their own.
    ``service_health``, when given, is called at each scrape for the service's snapshot health
    (``{"last_success": unix time or None, "failures": count}``): the collector keeps no state of its own.
    A finding is one series labelled as it was first raised (its ``layers`` and ``ranks`` stay put while it
    is active, so the alert it drives keeps its identity), with the severity it has now.
    """

    def __init__(self, aggregator: Aggregator, config: ExporterConfig | None = None,
                 clock: Callable[[], float] = time.time, version: str | None = None,
                 service_health: Callable[[], Mapping[str, float | None]] | None = None):
        self.aggregator = aggregator
        self.service_health = service_health
        self.config = config or ExporterConfig()
        self.clock = clock
        from gfservice import __version__

        self.version: str = version or __version__

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: the families depend on the runs at scrape time

    # ---- collect ----------------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        # One frozen view, copied under the aggregator's lock; everything below formats it without the lock.
        snap = self.aggregator.view(since=self.clock() - self.config.finding_linger_s)
        yield from self._run_metrics(snap)
        yield from self._health_metrics(snap)
        if self.service_health is not None:
            yield from _snapshot_metrics(self.service_health())

    def _run_metrics(self, snap: AggregatorView) -> Iterator[Metric]:
        g = {
            name: GaugeMetricFamily(f"gradflow_{name}", doc, labels=["run"])
            for name, doc in (
                ("grad_norm", "Global L2 gradient norm of the last merged step."),
                ("loss", "Loss of the last merged step."),
                ("learning_rate", "Learning rate of the first parameter group at the last merged step."),
                ("loss_scale", "GradScaler loss scale at the last merged step."),
                ("last_step", "Last merged step."),
                ("last_step_timestamp_seconds", "Unix time at which the service merged the last step."),
                ("run_finished", "1 once the training job closed its monitors, else 0."),
                ("run_world_size", "Ranks (processes) of the run."),
                ("run_attempt", "Attempts (starts) of the run so far, 1 for the first: one more each time the training "
                 "job restarts under the same run name."),
                ("nonfinite_layers", "Layers with NaN/Inf gradient values in the last merged step."),
                ("stalled_ranks", "Ranks missing from the last merged step (no report within the merge timeout)."),
                ("noise_scale", "Gradient noise scale B_simple = tr(Sigma)/|G|^2 of the last merged step, in per-rank "
                 "batches (McCandlish et al. 2018): one step's two-batch estimate from the DDP ranks' local norms, "
                 "noisy; only for runs with 2+ ranks reporting local norms."),
            )
        }
        depth = GaugeMetricFamily("gradflow_depth_grad_rms",
                                  "RMS gradient of contiguous depth buckets, 00 = input side.",
                                  labels=["run", "bucket"])
        layer = GaugeMetricFamily("gradflow_layer_grad_norm",
                                  "L2 gradient norm of a capped, evenly spaced set of layers and of the layers "
                                  "named in active findings.", labels=["run", "layer"])
        findings_total = CounterMetricFamily("gradflow_findings", "Findings raised.",
                                             labels=["run", "detector", "severity"])
        active = GaugeMetricFamily("gradflow_active_findings", "Findings active now.",
                                   labels=["run", "detector", "severity"])
        finding = GaugeMetricFamily(
            "gradflow_finding",
            "One series per active finding (and per finding cleared less than finding_linger_s ago); "
            "the value is the step at which it was first raised.",
            labels=["run", "detector", "severity", "key", "layers", "ranks"],
        )
        dropped = CounterMetricFamily("gradflow_reports_dropped",
                                      "Reports the run's senders dropped before they reached the service.",
                                      labels=["run"])
        buckets = self.config.depth_buckets
        width = max(2, len(str(buckets - 1)))
        for run in snap.runs:
            name = run.name
            st = run.latest
            if st is not None:
                grads = st.grads
                g["grad_norm"].add_metric([name], st.global_norm)
                for key, v in (("loss", st.loss), ("learning_rate", st.lr), ("loss_scale", st.loss_scale)):
                    if v is not None:
                        g[key].add_metric([name], v)
                if st.rank_norm is not None:  # DDP: each rank's local (pre-allreduce) norm, scaled by a GradScaler
                    local_sq = np.asarray(st.rank_norm, dtype=np.float64) ** 2 / (st.loss_scale or 1.0) ** 2
                    b_simple = noise_scale(local_sq, st.global_norm**2)[0]
                    if np.isfinite(b_simple):
                        g["noise_scale"].add_metric([name], b_simple)
                bad = (grads.nonfinite > 0) | ~np.isfinite(grads.sum_sq)
                g["nonfinite_layers"].add_metric([name], float(np.count_nonzero(bad)))
                for b, v in enumerate(depth_buckets(grads.sum_sq, grads.count, buckets)):
                    if v is not None:
                        depth.add_metric([name, f"{b:0{width}d}"], v)
                index = {n: i for i, n in enumerate(grads.layers)} if run.active else {}
                wanted = [index[n] for f in run.active for n in f.layers if n in index]
                norms = grads.norm
                for i in layer_selection(len(grads.layers), self.config.max_layer_series, wanted):
                    layer.add_metric([name, grads.layers[i]], float(norms[i]))
            if run.last_step >= 0:
                g["last_step"].add_metric([name], run.last_step)
                g["last_step_timestamp_seconds"].add_metric([name], run.last_time)
            g["run_finished"].add_metric([name], 1.0 if run.finished else 0.0)
            g["run_world_size"].add_metric([name], run.world_size)
            g["run_attempt"].add_metric([name], run.attempts)
            g["stalled_ranks"].add_metric([name], run.stalled_ranks)
            dropped.add_metric([name], run.sender_dropped)
            counts: dict[tuple[str, str], int] = dict.fromkeys(run.findings_total, 0)
            for f in run.active:
                k = (f.detector, f.severity.value)
                counts[k] = counts.get(k, 0) + 1
            for (det, sev), n in sorted(run.findings_total.items()):
                findings_total.add_metric([name, det, sev], n)
            for (det, sev), n in sorted(counts.items()):
                active.add_metric([name, det, sev], n)
            for labels, first_step in _finding_series(run).items():
                finding.add_metric(list(labels), first_step)
        yield from g.values()
        yield from (depth, layer, findings_total, active, finding, dropped)

    def _health_metrics(self, snap: AggregatorView) -> Iterator[Metric]:
        accepted = CounterMetricFamily("gradflow_messages_accepted", "Messages the aggregator took.")
        accepted.add_metric([], snap.accepted)
        rejected = CounterMetricFamily("gradflow_messages_rejected", "Messages the aggregator refused, by reason.",
                                       labels=["reason"])
        for reason in sorted({*KNOWN_REJECTIONS, *snap.rejected}):
            rejected.add_metric([reason], snap.rejected.get(reason, 0))
        latency = SummaryMetricFamily("gradflow_ingest_latency_seconds", "Time the aggregator spent on a message.",
                                      count_value=snap.ingest_count, sum_value=snap.ingest_seconds)
        seconds, errors = snap.detector_seconds, snap.detector_errors
        det_s = CounterMetricFamily("gradflow_detector_seconds", "Time spent in each detector, all runs.",
                                    labels=["detector"])
        det_e = CounterMetricFamily("gradflow_detector_errors", "Exceptions raised by each detector, all runs.",
                                    labels=["detector"])
        for det in sorted(set(seconds) | set(errors)):
            det_s.add_metric([det], seconds.get(det, 0.0))
            det_e.add_metric([det], errors.get(det, 0))
        runs = GaugeMetricFamily("gradflow_runs", "Runs the service tracks.")
        runs.add_metric([], len(snap.runs))
        build = GaugeMetricFamily("gradflow_build_info", "gfservice version (always 1).", labels=["version"])
        build.add_metric([self.version], 1)
        yield from (accepted, rejected, latency, det_s, det_e, runs, build)


def _snapshot_metrics(health: Mapping[str, float | None]) -> Iterator[Metric]:
    failures = CounterMetricFamily("gradflow_snapshot_failures", "Snapshot writes of the service that failed "
                                   "(submits are taken regardless; the state is not durable meanwhile).")
    failures.add_metric([], health.get("failures") or 0.0)
    yield failures
    last = health.get("last_success")
    if last is not None:  # absent until the first snapshot is written
        success = GaugeMetricFamily("gradflow_snapshot_last_success_timestamp_seconds",
                                    "Unix time of the service's last successful snapshot write.")
        success.add_metric([], last)
        yield success


def _finding_series(run: RunView) -> dict[tuple[str, ...], float]:
    """One ``gradflow_finding`` series per finding, active or recently cleared, labelled as first raised (its
    layers and ranks stay put while it is active, so the alert it drives keeps its identity) with the severity
    it has now; the value is the step at which it was first raised. A finding that fired again with the same
    labels shows once, as its newest occurrence (Prometheus would drop duplicate series).
    """
    series: dict[tuple[str, ...], float] = {}
    for f in [*run.recently_cleared, *run.active]:  # active last: they win over a cleared twin
        labels = (run.name, f.detector, f.severity.value, f.key, _describe(f.layers), format_ranks(f.ranks))
        series[labels] = float(f.since)
    return series


def _describe(layers: Sequence[str]) -> str:
    if not layers:
        return ""
    text = describe_layers(layers)
    return text if len(text) <= LABEL_LIMIT else text[: LABEL_LIMIT - 3] + "..."


def serve_metrics(aggregator: Aggregator, config: ExporterConfig | None = None,
                  **collector_options: Any) -> tuple[Any, threading.Thread, int]:
    """Serve ``/metrics`` for ``aggregator`` on its own registry; returns ``(server, thread, port)``.

    Bound to 127.0.0.1 unless ``config.address`` says otherwise; HTTPS when ``config.certfile`` is set.
    Stop it with ``server.shutdown(); server.server_close()``.

    >>> import urllib.request
    >>> server, thread, port = serve_metrics(Aggregator())
    >>> body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    >>> "gradflow_build_info" in body
    True
    >>> server.shutdown(); server.server_close()
    """
    config = config or ExporterConfig()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GradflowCollector(aggregator, config, **collector_options))
    tls: dict[str, Any] = {}
    if config.certfile:
        tls = {"certfile": config.certfile, "keyfile": config.keyfile}
        if config.client_cafile:
            tls.update(client_cafile=config.client_cafile, client_auth_required=True)
    server, thread = start_http_server(config.port, addr=config.address, registry=registry, **tls)
    return server, thread, int(server.server_port)
