"""The exporter keeps every other run when one run's series cannot be built, never raises on hostile values
or names, cuts and cleans label values, and never emits a label set twice.

The aggregator is real and fed real messages; hostile runs that validation would stop at the boundary are made
by editing a frozen view of it (``dataclasses.replace``), which is what the collector reads."""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gfservice.api import StepStats
from gfservice.observability.exporter import ExporterConfig, GradflowCollector
from gfservice.service.aggregator import Aggregator, AggregatorView
from gfservice.stats import GradStats
from gfservice.wire import Layout
from tests.promtools import promtool_bin, run_tool


def feed(agg: Aggregator, run: str, steps: int = 3, nan_at: tuple[int, ...] = ()) -> None:
    agg.submit(Layout(run=run, rank=0, world_size=1, layers=["a", "b"], numel=[2, 2], sharded=[False, False]))
    for i in range(steps):
        bad = i in nan_at
        agg.submit({"kind": "step", "run": run, "rank": 0, "step": i, "count": [2, 2],
                    "sum_sq": [1.0, float("nan") if bad else 4.0], "max_abs": [1.0, 2.0],
                    "nonfinite": [0, 2 if bad else 0]})


def frozen(view: AggregatorView) -> types.SimpleNamespace:
    """What the collector needs of an aggregator: ``view()`` (here always the given one)."""
    return types.SimpleNamespace(view=lambda since=None: view)


def scrape(source, **config) -> str:
    reg = CollectorRegistry(auto_describe=False)
    collector = GradflowCollector(source, ExporterConfig(**config))
    reg.register(collector)
    return generate_latest(reg).decode()


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def duplicates(text: str) -> list[tuple[str, frozenset]]:
    seen = Counter((n, frozenset(lab.items())) for n, lab, _ in samples(text))
    return [k for k, c in seen.items() if c > 1]


def promtool_clean(text: str) -> None:
    res = run_tool([promtool_bin(), "check", "metrics"], stdin=text)
    assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr


def broken_run(view: AggregatorView, name: str = "broken"):
    """A copy of the view's first run whose latest step has two layers but one entry per statistic."""
    run = view.runs[0]
    one = np.ones(1)
    grads = GradStats(layers=("a", "b"), count=one.astype(np.int64), sum_sq=one, max_abs=one,
                      nonfinite=np.zeros(1, np.int64))
    return dataclasses.replace(run, name=name, latest=StepStats(run=name, step=1, grads=grads))


def test_a_run_that_cannot_be_formatted_leaves_the_others_and_is_counted(caplog):
    agg = Aggregator()
    feed(agg, "good")
    view = agg.view()
    view = dataclasses.replace(view, runs=(broken_run(view), *view.runs))
    reg = CollectorRegistry(auto_describe=False)
    collector = GradflowCollector(frozen(view))
    reg.register(collector)
    text = generate_latest(reg).decode()
    promtool_clean(text)
    runs = {lab.get("run") for _, lab, _ in samples(text)} - {None}
    assert runs == {"good"}
    good = {n for n, lab, _ in samples(text) if lab.get("run") == "good"}
    assert {"gradflow_grad_norm", "gradflow_layer_grad_norm", "gradflow_depth_grad_rms", "gradflow_last_step"} <= good
    assert ("gradflow_export_errors_total", {"reason": "run"}, 1.0) in samples(text)
    assert next(r for r in caplog.records if "left out of the scrape" in r.getMessage()).levelname == "ERROR"
    caplog.clear()
    text = generate_latest(reg).decode()  # counted again (monotonic), logged no more than once a minute
    assert ("gradflow_export_errors_total", {"reason": "run"}, 2.0) in samples(text)
    assert collector.export_errors == {"run": 2, "service": 0, "duplicate_series": 0}
    assert not [r for r in caplog.records if "left out of the scrape" in r.getMessage()]


def test_a_failing_view_still_answers_with_the_collectors_own_health():
    def view(since=None):
        raise RuntimeError("the aggregator is broken")

    text = scrape(types.SimpleNamespace(view=view))
    promtool_clean(text)
    assert ("gradflow_export_errors_total", {"reason": "service"}, 1.0) in samples(text)
    assert any(n == "gradflow_build_info" for n, _, _ in samples(text))


def test_huge_numbers_and_hostile_names_never_raise():
    agg = Aggregator()
    feed(agg, "good")
    view = agg.view()
    run = view.runs[0]
    hostile = dataclasses.replace(
        run, name="evil\ud800\x00\n\x1b[31m" + "x" * 5000, last_step=10**400, world_size=10**400,
        attempts=-(10**400), sender_dropped=10**400, findings_total={("nonfinite", "critical"): 10**400},
        rejected={"stale_step": 10**400}, disabled_detectors={"boom\udfff": "errors"}, memory_bytes=10**400)
    view = dataclasses.replace(view, runs=(*view.runs, hostile), accepted=10**400, memory_bytes=10**400,
                               memory_limit_bytes=10**400, evicted={"memory": 10**400}, ingest_count=10**400)
    text = scrape(frozen(view))
    promtool_clean(text)
    assert not duplicates(text)
    evil = [(n, lab, v) for n, lab, v in samples(text) if lab.get("run", "").startswith("evil")]
    assert ("gradflow_last_step", math.inf) in [(n, v) for n, _, v in evil]
    assert ("gradflow_run_attempt", -math.inf) in [(n, v) for n, _, v in evil]
    name = evil[0][1]["run"]
    assert name.startswith("evil\ufffd\ufffd\ufffd\ufffd[31mxxx") and len(name.encode()) == 200
    assert ("gradflow_detector_disabled", "boom\ufffd") in [(n, lab.get("detector")) for n, lab, _ in evil]
    assert ("gradflow_memory_bytes", {}, math.inf) in samples(text)
    assert ("gradflow_runs_evicted_total", {"reason": "memory"}, math.inf) in samples(text)
    assert ("gradflow_export_errors_total", {"reason": "run"}, 0.0) in samples(text)


def test_new_series_of_the_view_are_exported():
    agg = Aggregator()
    feed(agg, "r")
    view = agg.view()
    run = dataclasses.replace(view.runs[0], rejected={"stale_step": 2, "invalid": 1},
                              disabled_detectors={"boom": "time"}, memory_bytes=1234)
    view = dataclasses.replace(view, runs=(run,), evicted={"memory": 3, "idle": 1}, memory_bytes=5678,
                               memory_limit_bytes=10_000)
    text = scrape(frozen(view))
    promtool_clean(text)
    got = samples(text)
    for sample in [
        ("gradflow_run_messages_rejected_total", {"run": "r", "reason": "stale_step"}, 2.0),
        ("gradflow_run_messages_rejected_total", {"run": "r", "reason": "invalid"}, 1.0),
        ("gradflow_detector_disabled", {"run": "r", "detector": "boom", "reason": "time"}, 1.0),
        ("gradflow_run_memory_bytes", {"run": "r"}, 1234.0),
        ("gradflow_runs_evicted_total", {"reason": "memory"}, 3.0),
        ("gradflow_runs_evicted_total", {"reason": "idle"}, 1.0),
        ("gradflow_runs_evicted_total", {"reason": "max_runs"}, 0.0),
        ("gradflow_memory_bytes", {}, 5678.0),
        ("gradflow_memory_limit_bytes", {}, 10_000.0),
    ]:
        assert sample in got, sample
    unbounded = scrape(frozen(dataclasses.replace(view, memory_limit_bytes=0)))
    assert not [n for n, _, _ in samples(unbounded) if n == "gradflow_memory_limit_bytes"]


def test_long_labels_are_cut_to_the_limit_and_stay_distinct():
    agg = Aggregator()
    stem = "run-" + "é" * 300
    feed(agg, "short")
    view = agg.view()
    runs = [dataclasses.replace(view.runs[0], name=stem + tail) for tail in ("1", "2")]
    text = scrape(frozen(dataclasses.replace(view, runs=(*view.runs, *runs))), label_value_limit=64)
    promtool_clean(text)
    names = {lab["run"] for n, lab, _ in samples(text) if n == "gradflow_last_step"}
    assert len(names) == 3 and "short" in names
    for n in names - {"short"}:
        assert len(n.encode()) <= 64 and n.startswith("run-éé") and n[-11:-8] == "..."
    assert all(len(v.encode()) <= 64 for _, lab, _ in samples(text) for v in lab.values())


def test_label_sets_that_collide_after_cleaning_emit_one_series_and_are_counted():
    agg = Aggregator()
    feed(agg, "r")
    view = agg.view()
    old, new = (dataclasses.replace(view.runs[0], name=f"twin{chr(i)}", last_time=t)  # both clean to "twin\ufffd"
                for i, t in ((1, 100.0), (2, 200.0)))
    old = dataclasses.replace(old, last_step=7)
    new = dataclasses.replace(new, last_step=9)
    reg = CollectorRegistry(auto_describe=False)
    collector = GradflowCollector(frozen(dataclasses.replace(view, runs=(new, old))))
    reg.register(collector)
    text = generate_latest(reg).decode()
    promtool_clean(text)
    assert not duplicates(text)
    assert [v for n, lab, v in samples(text) if n == "gradflow_last_step" and lab["run"] != "r"] == [9.0]  # newest
    assert collector.export_errors["duplicate_series"] > 0
    assert ("gradflow_export_errors_total", {"reason": "duplicate_series"},
            float(collector.export_errors["duplicate_series"])) in samples(text)


def test_a_finding_that_clears_and_fires_again_is_one_series():
    agg = Aggregator()
    feed(agg, "r", steps=6, nan_at=(1, 3, 5))  # raised at 1, 3 and 5, cleared at 2 and 4: same labels each time
    view = agg.view(since=0)
    assert len(view.runs[0].recently_cleared) == 2 and len(view.runs[0].active) == 1
    text = scrape(agg)
    promtool_clean(text)
    assert not duplicates(text)
    found = [v for n, lab, v in samples(text) if n == "gradflow_finding" and lab["detector"] == "nonfinite"]
    assert found == [5.0]  # the occurrence that is active now


def test_a_cleared_finding_with_a_more_severe_twin_keeps_the_severe_one():
    agg = Aggregator()
    feed(agg, "r", steps=6, nan_at=(1, 3, 5))
    view = agg.view(since=0)
    run = view.runs[0]
    first = run.recently_cleared[0]
    # Two runs whose names clean to one label: the active finding outranks the cleared one whatever the age.
    a = dataclasses.replace(run, name="x\ud800", active=(), recently_cleared=(first,), last_time=1e12)
    b = dataclasses.replace(run, name="x\udc00", last_time=1.0)
    text = scrape(frozen(dataclasses.replace(view, runs=(b, a))))
    assert not duplicates(text)
    assert [v for n, lab, v in samples(text) if n == "gradflow_finding" and lab["detector"] == "nonfinite"] == [5.0]


@functools.cache
def base_view() -> AggregatorView:
    base = Aggregator()
    feed(base, "base")
    return base.view()


names = st.text(st.characters(codec=None, exclude_categories=()), max_size=300)
numbers = st.one_of(st.integers(min_value=-(10**400), max_value=10**400),
                    st.floats(allow_nan=True, allow_infinity=True))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(run_names=st.lists(names, min_size=1, max_size=4), values=st.lists(numbers, min_size=6, max_size=6),
       reasons=st.dictionaries(names, numbers, max_size=3), limit=st.integers(32, 300))
def test_any_names_and_values_scrape_cleanly(run_names, values, reasons, limit):
    view = base_view()
    run = view.runs[0]
    runs = tuple(
        dataclasses.replace(run, name=name, last_step=values[0], world_size=values[1], sender_dropped=values[2],
                            memory_bytes=values[3], rejected=reasons, disabled_detectors={name: "errors"},
                            findings_total={(name, "warning"): values[4]}, last_time=values[5])
        for name in run_names)
    text = scrape(frozen(dataclasses.replace(view, runs=(run, *runs), evicted=reasons)), label_value_limit=limit)
    got = samples(text)  # parses
    assert not duplicates(text)
    assert all(len(v.encode()) <= limit for _, lab, _ in got for v in lab.values())
    assert [v for n, lab, v in got if n == "gradflow_grad_norm" and lab["run"] == "base"] == [math.sqrt(5)]


@pytest.mark.parametrize("accept", ["", "application/openmetrics-text; version=1.0.0"])
def test_promtool_accepts_a_hostile_scrape_in_both_formats(accept):
    from prometheus_client.exposition import choose_encoder

    agg = Aggregator()
    feed(agg, "good", nan_at=(2,))
    view = agg.view()
    hostile = dataclasses.replace(view.runs[0], name="bad\ud800\r\n\"\\" + "y" * 400, last_step=10**400)
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GradflowCollector(frozen(dataclasses.replace(view, runs=(*view.runs, broken_run(view), hostile)))))
    encoder, _ = choose_encoder(accept)
    text = encoder(reg).decode()
    if not accept:
        promtool_clean(text)
    assert "gradflow_finding{" in text and 'run="good"' in text
