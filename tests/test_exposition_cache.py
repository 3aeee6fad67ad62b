"""The exporter's own exposition (``GradflowCollector.exposition``, what ``/metrics`` answers): byte for byte what
prometheus_client's encoders write from the same collector, in the text format and in OpenMetrics, as runs come,
change, raise findings, collide after their names are cleaned, and go; and each run's lines are kept while it
does not change."""

from __future__ import annotations

import dataclasses
import urllib.request

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from gfservice.config import ExporterConfig
from gfservice.observability.exporter import GradflowCollector, serve_metrics
from gfservice.service.aggregator import Aggregator
from gfservice.wire import Layout


def _run(agg: Aggregator, run: str, steps: range, layers: int = 5, nan_at: int | None = None) -> None:
    agg.submit(Layout(run=run, rank=0, world_size=1, layers=[f'l{i}.w"\\' for i in range(layers)],
                      numel=[4] * layers, sharded=[False] * layers))
    for s in steps:
        sq = np.full(layers, 1.0 + s)
        nonfinite = np.zeros(layers, np.int64)
        if s == nan_at:
            sq[1], nonfinite[1] = np.nan, 1
        agg.submit({"kind": "step", "run": run, "rank": 0, "step": s, "count": [4] * layers, "sum_sq": list(sq),
                    "max_abs": [1.0] * layers, "nonfinite": list(nonfinite), "loss": 2.0, "lr": 1e-3})


def _same(c: GradflowCollector) -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(c)
    fast = c.exposition()
    assert fast == generate_latest(reg)
    assert c.exposition(openmetrics=True) == generate_openmetrics(reg)
    return fast


def test_the_exposition_is_what_prometheus_client_writes_as_runs_come_change_and_go():
    agg = Aggregator()
    now = [1000.0]
    c = GradflowCollector(agg, ExporterConfig(max_layer_series=3, label_value_limit=40), clock=lambda: now[0],
                          service_health=lambda: {"last_success": 5.0, "failures": 1.0})
    _same(c)  # no runs yet
    _run(agg, "plain", range(3))
    _run(agg, "odd.name:1", range(2), nan_at=1)  # a finding with layers (whose names need escaping)
    _run(agg, "x" * 60 + "a", range(1))  # two names cut to 40 bytes: distinct by their hash suffix
    _run(agg, "x" * 60 + "b", range(1))
    first = _same(c)
    assert b"gradflow_finding{" in first
    kept = dict(c._cache)
    again = _same(c)
    assert again == first and all(c._cache[k] is kept[k] for k in kept), "unchanged runs are not formatted again"
    _run(agg, "plain", range(3, 4))
    _same(c)
    assert c._cache["plain"] is not kept["plain"] and c._cache["x" * 60 + "a"] is kept["x" * 60 + "a"]
    # two run names cleaned to one label (control characters become U+FFFD; the wire refuses them, a view
    # made by hand has them): the slow merge, counted as duplicate series
    class Renamed:
        def view(self, since=None):
            v = agg.view(since)
            names = {"plain": "ctl\x01", "odd.name:1": "ctl\x02", "x" * 60 + "a": 'q "quoted"\\'}
            return dataclasses.replace(v, runs=tuple(dataclasses.replace(r, name=names.get(r.name, r.name))
                                                     for r in v.runs))

    def twins() -> tuple[GradflowCollector, CollectorRegistry]:  # the duplicate count is the collector's state
        twin = GradflowCollector(Renamed(), clock=lambda: now[0])
        reg = CollectorRegistry(auto_describe=False)
        reg.register(twin)
        return twin, reg

    fast = twins()[0].exposition().decode()
    assert fast.encode() == generate_latest(twins()[1])
    assert twins()[0].exposition(openmetrics=True) == generate_openmetrics(twins()[1])
    assert 'gradflow_export_errors_total{reason="duplicate_series"} 0.0' not in fast
    assert 'run="q \\"quoted\\"\\\\"' in fast
    # a run that goes leaves the cache
    shown = {"plain", "odd.name:1"}

    class Some:
        def view(self, since=None):
            v = agg.view(since)
            return dataclasses.replace(v, runs=tuple(r for r in v.runs if r.name in shown))

    c2 = GradflowCollector(Some())
    _same(c2)
    shown.discard("plain")
    _same(c2)
    assert set(c2._cache) == {"odd.name:1"}


def test_metrics_server_answers_with_the_fast_exposition_in_both_formats():
    agg = Aggregator()
    _run(agg, "r", range(2))
    server, _thread, port = serve_metrics(agg)
    try:
        plain = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics",
                                     headers={"Accept": "application/openmetrics-text;version=1.0.0"})
        om = urllib.request.urlopen(req).read()
        reg = CollectorRegistry(auto_describe=False)
        reg.register(server.registry.collector)
        assert plain == generate_latest(reg) and om == generate_openmetrics(reg) and om.endswith(b"# EOF\n")
    finally:
        server.shutdown()
        server.server_close()
