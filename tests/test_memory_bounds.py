"""Memory bounded in bytes: junk runs never push out a real run with an active finding, the byte accounting
follows reality, finished runs are retired after their time to live."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest

from gfservice import registry
from gfservice.config import AggregatorConfig
from gfservice.service.aggregator import Aggregator
from gfservice.service.memory import layout_bytes, record_bytes, report_bytes, step_bytes

NAN = float("nan")
NonFinite = registry.available()["nonfinite"]


def layout(run: str, layers: int = 1, rank: int = 0, world: int = 1) -> dict:
    return {"kind": "layout", "run": run, "rank": rank, "world_size": world,
            "layers": [f"blocks.{i}.weight" for i in range(layers)], "numel": [64] * layers,
            "sharded": [world > 1] * layers}


def report(run: str, step: int, layers: int = 1, value: float = 1.0, rank: int = 0, deep: bool = False) -> dict:
    bad = value != value
    stats = {"count": np.full(layers, 64), "sum_sq": np.full(layers, value), "max_abs": np.full(layers, value),
             "nonfinite": np.full(layers, 64 if bad else 0)}
    if deep:
        hist = np.zeros((layers, 256), np.int64)
        hist[:, 120] = 64
        stats |= {"sum_abs": np.full(layers, value), "zeros": np.zeros(layers, np.int64), "exp_hist": hist,
                  "dead_units": np.zeros(layers, np.int64), "weight_sq": np.ones(layers),
                  "update_sq": np.full(layers, 1e-6)}
    return {"kind": "step", "run": run, "rank": rank, "step": step, "time": 1000.0 + step, "stats": stats}


def stopping_detectors() -> dict:
    return {"nonfinite": NonFinite(stop_run=True)}


def real_run_with_a_verdict(agg: Aggregator, steps: int = 5) -> str:
    """A run of a few healthy steps, then a NaN step: an active critical finding and a stop verdict."""
    assert agg.submit(layout("real", layers=4)).accepted
    for s in range(steps):
        assert agg.submit(report("real", s, layers=4)).accepted
    ack = agg.submit(report("real", steps, layers=4, value=NAN))
    assert [f.detector for f in ack.new_findings] == ["nonfinite"]
    reason = agg.should_stop("real")
    assert reason is not None and reason.startswith("nonfinite")
    return reason


@pytest.mark.slow  # 10,000 layouts and 1,000 steps through submit: about 5 s on two cores
def test_ten_thousand_junk_runs_leave_the_real_run_its_findings_and_its_verdict():
    agg = Aggregator(AggregatorConfig(max_runs=100), detector_factory=stopping_detectors)
    verdict = real_run_with_a_verdict(agg)
    for i in range(10_000):
        assert agg.submit(layout(f"junk-{i}")).accepted
        if i % 10 == 0:  # a thousand of them send their one step too
            assert agg.submit(report(f"junk-{i}", 0)).accepted
    view = agg.view()
    assert len(view.runs) <= 100
    assert view.evicted.get("max_runs", 0) >= 10_000 - 100
    assert agg.should_stop("real") == verdict
    assert [(f.detector, f.first_step, f.active) for f in agg.findings("real")] == [("nonfinite", 5, True)]
    real = agg.run_view("real")
    assert real.last_step == 5 and [f.detector for f in real.active] == ["nonfinite"]
    assert "junk-0" not in {r.name for r in view.runs}  # the junk went instead


def test_a_memory_budget_evicts_junk_before_the_real_run_and_holds():
    limit = 3 * 1024 * 1024
    agg = Aggregator(AggregatorConfig(max_memory_bytes=limit, history=50), detector_factory=stopping_detectors)
    verdict = real_run_with_a_verdict(agg)
    for i in range(300):  # 300 runs of 200 layers and two steps each: about 20 MiB without a bound
        assert agg.submit(layout(f"junk-{i}", layers=200)).accepted
        for s in range(2):
            assert agg.submit(report(f"junk-{i}", s, layers=200)).accepted
        assert agg.view().memory_bytes <= limit
    view = agg.view()
    assert view.evicted.get("memory", 0) > 200 and view.memory_limit_bytes == limit
    assert agg.should_stop("real") == verdict
    assert [f.detector for f in agg.run_view("real").active] == ["nonfinite"]
    assert sum(r.memory_bytes for r in view.runs) == view.memory_bytes


def test_eviction_order_finished_then_idle_then_live_then_live_with_findings():
    now = [10_000.0]
    cfg = AggregatorConfig(max_runs=4, idle_after_s=600)
    agg = Aggregator(cfg, detector_factory=stopping_detectors, monotonic=lambda: now[0])
    real_run_with_a_verdict(agg)
    for name in ("done", "idle", "live"):
        agg.submit(layout(name))
        agg.submit(report(name, 0))
    agg.submit({"kind": "end", "run": "done", "rank": 0})
    now[0] += 500
    agg.submit(report("live", 1))
    agg.submit(report("real", 6, layers=4, value=NAN))
    now[0] += 200  # "idle" sent nothing for 700 s, "live" and "real" for 200 s
    gone = []
    for i in range(4):
        before = {r.name for r in agg.view().runs}
        agg.submit(layout(f"new-{i}"))
        after = {r.name for r in agg.view().runs}
        gone += sorted(before - after)
    assert gone[:3] == ["done", "idle", "live"]
    assert "real" in {r.name for r in agg.view().runs}
    assert agg.view().evicted == {"max_runs": 4}


def test_finished_runs_are_retired_after_their_time_to_live():
    now = [1000.0]
    agg = Aggregator(AggregatorConfig(finished_ttl_s=60), detector_factory=stopping_detectors,
                     monotonic=lambda: now[0])
    for name in ("done", "live"):
        agg.submit(layout(name))
        agg.submit(report(name, 0))
    agg.submit({"kind": "end", "run": "done", "rank": 0})
    agg.tick()  # first seen finished now: the time to live runs from here
    now[0] += 59
    agg.tick()
    assert {r.name for r in agg.view().runs} == {"done", "live"}
    now[0] += 2
    agg.tick()
    assert {r.name for r in agg.view().runs} == {"live"}
    assert agg.view().evicted == {"finished_ttl": 1}
    assert agg.should_stop("done") is None  # a forgotten run answers like an unknown one
    with pytest.raises(KeyError, match="unknown run 'done'"):
        agg.findings("done")


def test_the_accounting_matches_a_recount_through_merges_pending_steps_and_a_restart():
    agg = Aggregator(AggregatorConfig(history=3, findings_history=2), detector_factory=stopping_detectors)
    for rank in range(2):
        agg.submit(layout("r", layers=5, rank=rank, world=2))
    for s in range(6):
        agg.submit(report("r", s, layers=5, rank=0, value=NAN if s % 2 else 1.0))
        if s < 4:
            agg.submit(report("r", s, layers=5, rank=1, deep=s == 2))
    run = agg._runs["r"]  # the private run: its containers against the accounted parts
    mem = run.memory
    assert len(run.history) == 3 and run.pending
    assert mem.history == sum(step_bytes(s) for s in run.history)
    assert mem.pending == sum(report_bytes(r) for slot in run.pending.values() for r in slot.values())
    assert mem.layouts == sum(layout_bytes(lay) for lay in run.layouts.values())
    assert mem.findings == sum(record_bytes(rec) for rec in run.log)
    assert agg.view().memory_bytes == mem.total
    agg.submit({**layout("r", layers=5, world=2), "attempt": "second"})  # a restart: pending steps dropped
    assert mem.pending == 0 and mem.layouts == layout_bytes(run.layouts[0])


def test_byte_accounting_is_within_a_factor_of_tracemalloc_for_a_1000_layer_run():
    """The accounted bytes of a 1,000-layer run (built-in detectors, 60 steps, deep every 10) against what
    tracemalloc sees allocated and still held: within a factor of 1.5 either way."""
    agg = Aggregator(AggregatorConfig(history=1000))
    agg.submit(layout("warm-up", layers=1000))  # imports, caches and worker threads before tracing
    agg.submit(report("warm-up", 0, layers=1000, deep=True))
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        assert agg.submit(layout("big", layers=1000)).accepted
        for s in range(60):  # each message built here and dropped: what stays is what the service holds
            assert agg.submit(report("big", s, layers=1000, value=1.0 + 0.01 * (s % 7), deep=s % 10 == 0)).accepted
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    accounted = agg.run_view("big").memory_bytes
    print(f"accounted {accounted} bytes, tracemalloc {held} bytes: {accounted / held:.2f}x")
    assert held / 1.5 <= accounted <= held * 1.5, (accounted, held)
