"""Noisy neighbours inside the aggregator: detectors that raise, return garbage, sleep, hang or cannot save their
state are isolated (the step's other findings kept, error and time budgets, a ``detector_disabled`` finding, rate
limited logs, no lock held that another run or a scrape needs); and the admission checks that need the run (step
jumps, a RunEnd from a rank without a layout, layouts inconsistent across ranks) refuse and count per run."""

from __future__ import annotations

import json
import logging
import statistics
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfservice.api import Detector, Finding, StepStats
from gfservice.service.aggregator import DETECTOR_DISABLED, Aggregator, AggregatorConfig
from gfservice.service.state import decode, encode
from gfservice_detectors.nonfinite import NonFinite

LAYERS = ["a.weight", "a.bias"]
NAN = float("nan")


def layout(run: str, rank: int = 0, world: int = 1, **kw) -> dict:
    return {"kind": "layout", "run": run, "rank": rank, "world_size": world, "layers": list(LAYERS),
            "numel": [10, 2], "sharded": [False, False], **kw}


def report(run: str, step: int, rank: int = 0, nan: bool = False, **kw) -> dict:
    sq = [NAN if nan else 1.0, 0.5]
    return {"kind": "step", "run": run, "rank": rank, "step": step, "count": [10, 2], "sum_sq": sq,
            "max_abs": [1.0, 0.5], "nonfinite": [10 if nan else 0, 0], **kw}


def accept(agg: Aggregator, msg: dict) -> tuple[Finding, ...]:
    ack = agg.submit(msg)
    assert ack.accepted, f"rejected ({ack.reason}): {msg!r:.200}"
    return ack.new_findings


def refuse(agg: Aggregator, msg: dict, reason: str) -> None:
    ack = agg.submit(msg)
    assert not ack.accepted and ack.reason == reason, ack


def rview(agg: Aggregator, run: str):
    (rv,) = [r for r in agg.view().runs if r.name == run]
    return rv


# ---- badly behaved detectors ------------------------------------------------------------------------------
class Raises(Detector):
    name = "bad"

    def update(self, step: StepStats):
        raise RuntimeError("bug in a plugin")


class Returns42(Detector):
    name = "bad"

    def update(self, step: StepStats):
        return 42


class ReturnsInts(Detector):
    name = "bad"

    def update(self, step: StepStats):
        return [1, 2, 3]


class OtherRunsFinding(Detector):
    name = "bad"

    def update(self, step: StepStats):
        return [Finding(detector="bad", severity="critical", run="someone-else", step=step.step, message="x")]


class Sleeps(Detector):
    """Sleeps ``Sleeps.seconds`` on every step of run "a" (a slow plugin on one run)."""

    name = "bad"
    seconds = 2.0

    def update(self, step: StepStats):
        if step.run == "a":
            time.sleep(self.seconds)
        return []


HANG = threading.Event()


class Hangs(Detector):
    """Never returns on run "r" (until the test lets it go)."""

    name = "bad"

    def update(self, step: StepStats):
        if step.run == "r":
            HANG.wait()
        return []


@pytest.fixture(autouse=True)
def _release_hung_detectors():
    HANG.clear()
    yield
    HANG.set()  # the abandoned threads finish; their results are dropped


def service(bad: type[Detector], **config) -> Aggregator:
    cfg = AggregatorConfig(**{"detector_error_budget": 3, "detector_time_budget_s": 0.3, **config})
    return Aggregator(cfg, detector_factory=lambda: {"bad": bad(), "nonfinite": NonFinite()})


@pytest.mark.parametrize("bad", [Raises, Returns42, ReturnsInts, OtherRunsFinding])
def test_a_failing_detector_loses_no_finding_and_is_disabled_past_its_error_budget(bad, caplog):
    agg = service(bad)
    accept(agg, layout("r"))
    accept(agg, layout("other"))
    with caplog.at_level(logging.WARNING, logger="gfservice.service.aggregator"):
        (nan,) = accept(agg, report("r", 0, nan=True))  # the same step's nonfinite finding is kept
        assert nan.detector == "nonfinite"
        assert accept(agg, report("r", 1, nan=True)) == ()  # still active, not new
        (disabled,) = accept(agg, report("r", 2, nan=True))  # the third error: past the budget
        for step in range(3, 6):
            assert accept(agg, report("r", step)) == ()  # not called any more: no more errors
    assert (disabled.detector, disabled.key, disabled.severity.value) == (DETECTOR_DISABLED, "bad", "warning")
    assert "detector bad is disabled for this run: 3 errors" in disabled.message
    assert "gfservice configure r --set bad.enabled=true" in disabled.message
    rv = rview(agg, "r")
    assert rv.disabled_detectors == {"bad": "errors"} and rv.detector_errors == {"bad": 3}
    assert {f.detector for f in rv.active} == {DETECTOR_DISABLED}  # nonfinite cleared at step 3
    assert [f.detector for f in agg.findings("r")] == ["nonfinite", DETECTOR_DISABLED]
    # the error log: the first error with its traceback, then nothing until the summary minute; one warning
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "detector bad failed on run r step 0" in errors[0].getMessage()
    assert sum("is disabled for run r" in r.getMessage() for r in caplog.records) == 1
    # another run of the same service keeps its own budget and its findings
    (other,) = accept(agg, report("other", 0, nan=True))
    assert other.detector == "nonfinite" and rview(agg, "other").disabled_detectors == {}
    assert agg.counters()["rejected"] == {}


def test_configure_re_enables_a_disabled_detector_fresh():
    agg = service(Raises)
    accept(agg, layout("r"))
    for step in range(3):
        accept(agg, report("r", step))
    summary = agg.configure("r", {"bad": {"enabled": True}})
    assert summary["detectors"]["bad"]["state"] == "re-enabled"
    rv = rview(agg, "r")
    assert rv.disabled_detectors == {} and [f.detector for f in rv.active] == []  # the notice cleared
    accept(agg, report("r", 3))
    assert rview(agg, "r").detector_errors == {"bad": 4}  # called again


def test_a_detector_past_its_time_budget_is_disabled_and_the_step_keeps_its_findings():
    agg = service(Sleeps)
    accept(agg, layout("a"))
    t0 = time.perf_counter()
    found = accept(agg, report("a", 0, nan=True))
    waited = time.perf_counter() - t0
    assert 0.3 <= waited < 1.5, waited  # the budget, not the detector's 2 s
    assert sorted(f.detector for f in found) == [DETECTOR_DISABLED, "nonfinite"]
    (notice,) = [f for f in found if f.detector == DETECTOR_DISABLED]
    assert "took more than its time budget of 0.3 s" in notice.message
    t0 = time.perf_counter()
    accept(agg, report("a", 1, nan=True))
    assert time.perf_counter() - t0 < 0.3  # not called any more
    assert rview(agg, "a").disabled_detectors == {"bad": "time"}


def test_a_hung_detector_hangs_neither_its_run_nor_others_nor_scrapes():
    agg = service(Hangs, detector_time_budget_s=1.5)
    accept(agg, layout("r"))
    accept(agg, layout("other"))
    result: list[tuple[Finding, ...]] = []
    hung = threading.Thread(target=lambda: result.append(accept(agg, report("r", 0, nan=True))))
    t_start = time.perf_counter()
    hung.start()
    time.sleep(0.1)  # run r's step is waiting for its hung detector now
    t0 = time.perf_counter()
    assert [f.detector for f in accept(agg, report("other", 0, nan=True))] == ["nonfinite"]
    assert accept(agg, report("other", 1, nan=True)) == ()
    assert [r.name for r in agg.view().runs] == ["r", "other"]
    assert agg.state_dict()["runs"]["other"]["detectors"].keys() == {"bad", "nonfinite"}
    assert time.perf_counter() - t0 < 1.0 and hung.is_alive()  # the snapshot waits 0.1 s for the busy run
    hung.join()
    assert 1.5 <= time.perf_counter() - t_start < 2.5  # the budget: then the hung thread is written off
    assert sorted(f.detector for f in result[0]) == [DETECTOR_DISABLED, "nonfinite"]
    # its run goes on without it
    t0 = time.perf_counter()
    assert accept(agg, report("r", 1, nan=True)) == ()
    assert time.perf_counter() - t0 < 0.5
    assert rview(agg, "r").disabled_detectors == {"bad": "time"} and rview(agg, "other").disabled_detectors == {}
    # a snapshot does not wait for the hung detector, and leaves its state out
    assert set(agg.state_dict()["runs"]["r"]["detectors"]) == {"nonfinite"}


@pytest.mark.slow
def test_a_slow_detector_on_one_run_does_not_delay_another_runs_ingest_or_a_scrape():
    """The issue's case: a detector that sleeps 3 s per step on run A; run B submits meanwhile."""
    Sleeps.seconds = 3.0
    try:
        cfg = AggregatorConfig(detector_time_budget_s=10.0)
        slow = Aggregator(cfg, detector_factory=lambda: {"bad": Sleeps(), "nonfinite": NonFinite()})
        accept(slow, layout("a"))
        accept(slow, layout("b"))
        accept(slow, report("b", 0))
        busy = threading.Thread(target=lambda: accept(slow, report("a", 0, nan=True)))
        t_start = time.perf_counter()
        busy.start()
        time.sleep(0.2)  # run A is inside its 3 s detector now
        latencies, scrapes = [], []
        step = 1
        while busy.is_alive() and time.perf_counter() - t_start < 2.5:
            t0 = time.perf_counter()
            accept(slow, report("b", step))
            latencies.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            slow.view()
            scrapes.append(time.perf_counter() - t0)
            step += 1
            time.sleep(0.01)
        assert busy.is_alive()  # everything above happened while run A was in its detector
        busy.join()
    finally:
        Sleeps.seconds = 2.0
    print(f"run B submit during run A's 3 s detector: {len(latencies)} steps, median "
          f"{statistics.median(latencies) * 1e3:.2f} ms, max {max(latencies) * 1e3:.2f} ms; view() max "
          f"{max(scrapes) * 1e3:.2f} ms")
    assert len(latencies) >= 20
    assert statistics.median(latencies) < 0.02  # a few ms (the detector takes 3 s)
    assert max(latencies) < 0.25 and max(scrapes) < 0.25  # slack for a shared 2-core machine
    assert rview(slow, "a").last_step == 0 and rview(slow, "b").last_step == step - 1


# ---- snapshots with unsaveable detector state -------------------------------------------------------------
class Unsaveable(Detector):
    name = "unsaveable"

    def update(self, step: StepStats):
        return []

    def state_dict(self):
        return {"lock": threading.Lock()}  # not plain data


class StateRaises(Detector):
    name = "state_raises"

    def update(self, step: StepStats):
        return []

    def state_dict(self):
        raise RuntimeError("cannot save")

    def load_state_dict(self, state):
        raise RuntimeError("cannot load")


class Counting(Detector):
    name = "counting"

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self.seen = 0

    def update(self, step: StepStats):
        self.seen += 1
        return []

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = int(state["seen"])


def test_a_detector_whose_state_cannot_be_saved_breaks_no_snapshot(caplog):
    def factory():
        return {"unsaveable": Unsaveable(), "state_raises": StateRaises(), "counting": Counting(),
                "nonfinite": NonFinite()}

    agg = Aggregator(detector_factory=factory)
    for run in ("r", "other"):
        accept(agg, layout(run))
        accept(agg, report(run, 0, nan=True))
        accept(agg, report(run, 1, nan=True))
    with caplog.at_level(logging.ERROR, logger="gfservice.service.aggregator"):
        state = agg.state_dict()
        agg.state_dict()
    assert sum("cannot be saved" in r.getMessage() for r in caplog.records) == 4  # once per detector and run
    for run in ("r", "other"):
        assert set(state["runs"][run]["detectors"]) == {"counting", "nonfinite"}
    text = json.dumps(encode(state))  # what the snapshot writer does
    restored = Aggregator(detector_factory=factory)
    with caplog.at_level(logging.ERROR, logger="gfservice.service.aggregator"):
        restored.load_state_dict(decode(json.loads(text)))  # state_raises cannot load: it starts fresh
    assert restored._runs["r"].detectors["counting"].seen == 2
    assert [f.detector for f in restored.active_findings("r")] == ["nonfinite"]
    assert accept(restored, report("r", 2)) == ()


# ---- admission checks that need the run ------------------------------------------------------------------
@pytest.fixture
def real_run():
    """A service with a real run 'r' (one rank) holding an active nonfinite finding at step 5."""
    agg = Aggregator(detector_factory=lambda: {"nonfinite": NonFinite()})
    accept(agg, layout("r", attempt="a1"))
    for step in range(5):
        accept(agg, report("r", step, attempt="a1"))
    accept(agg, report("r", 5, nan=True, attempt="a1"))
    return agg


def _unharmed(agg: Aggregator, step: int) -> None:
    rv = rview(agg, "r")
    assert [(f.detector, f.first_step) for f in rv.active] == [("nonfinite", 5)] and not rv.finished
    assert accept(agg, report("r", step, nan=True, attempt="a1")) == ()
    assert rview(agg, "r").last_step == step


def test_a_step_far_ahead_is_refused_and_real_steps_go_on(real_run):
    agg = real_run
    refuse(agg, report("r", 10**12, attempt="a1"), "step_jump")
    refuse(agg, report("r", 5 + 1_000_001, attempt="a1"), "step_jump")
    assert not agg.submit(report("r", 2**62, attempt="a1")).accepted
    _unharmed(agg, 6)
    accept(agg, report("r", 6 + 1_000_000, nan=True, attempt="a1"))  # exactly the allowed jump
    assert rview(agg, "r").rejected == {"step_jump": 2, "invalid": 1}
    assert agg.view().rejected == {"step_jump": 2, "invalid": 1}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 40), st.integers(0, 2**53), st.integers(-(2**70), 2**70)), max_size=12))
def test_no_sequence_of_step_numbers_blocks_the_real_steps(steps):
    """Whatever step numbers arrive, each is taken or refused with a reason, the accepted ones never jump
    further than the limit, and the real run's next step is always taken."""
    agg = Aggregator(AggregatorConfig(max_step_jump=100), detector_factory=lambda: {"nonfinite": NonFinite()})
    accept(agg, layout("r"))
    accept(agg, report("r", 0, nan=True))
    last = 0
    for step in steps:
        ack = agg.submit(report("r", step))
        assert ack.accepted == (last < step <= last + 100), (step, last, ack)
        last = step if ack.accepted else last
    accept(agg, report("r", last + 1))
    assert rview(agg, "r").last_step == last + 1
    assert sum(rview(agg, "r").rejected.values()) == agg.view().ingest_count - agg.view().accepted


def test_the_first_step_of_an_attempt_may_start_anywhere():
    agg = Aggregator(AggregatorConfig(max_step_jump=10), detector_factory=dict)
    accept(agg, layout("r"))
    accept(agg, report("r", 500_000))  # resumed from a checkpoint
    refuse(agg, report("r", 500_011), "step_jump")
    accept(agg, report("r", 500_010))


def test_a_run_end_from_a_rank_without_a_layout_neither_finishes_nor_counts(real_run):
    agg = real_run
    refuse(agg, {"kind": "end", "run": "r", "rank": 7, "attempt": "a1"}, "unknown_rank")
    assert not rview(agg, "r").finished
    _unharmed(agg, 6)
    assert rview(agg, "r").rejected == {"unknown_rank": 1}
    accept(agg, {"kind": "end", "run": "r", "rank": 0, "attempt": "a1"})
    assert rview(agg, "r").finished


@pytest.mark.parametrize("change, detail", [
    ({"sharded": [True, False]}, "other sharded flags than rank 0 (first at layer a.weight)"),
    ({"numel": [10, 3]}, "other sizes (numel) than rank 0 (first at layer a.bias)"),
    ({"units": [5, 1]}, "other units than rank 0"),
    ({"layers": ["x", "a.bias"]}, "reports other layers"),
    ({"world_size": 3, "rank": 2}, "reports world size 3, the run's other ranks 2"),
])
def test_a_layout_inconsistent_with_the_other_ranks_is_refused(change, detail, caplog):
    agg = Aggregator(detector_factory=lambda: {"nonfinite": NonFinite()})
    accept(agg, layout("r", rank=0, world=2, attempt="a1", units=[5, 2]))
    accept(agg, layout("r", rank=1, world=2, attempt="a1", units=[5, 2]))
    accept(agg, report("r", 0, rank=0, nan=True, attempt="a1"))
    (nan,) = accept(agg, report("r", 0, rank=1, nan=True, attempt="a1"))
    assert nan.detector == "nonfinite"
    with caplog.at_level(logging.DEBUG, logger="gfservice.service.aggregator"):
        refuse(agg, {**layout("r", rank=1, world=2, attempt="a1", units=[5, 2]), **change}, "layout_mismatch")
    assert any(detail in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    rv = rview(agg, "r")
    assert rv.rejected == {"layout_mismatch": 1} and rv.world_size == 2
    assert [f.detector for f in rv.active] == ["nonfinite"]
    accept(agg, report("r", 1, rank=0, attempt="a1"))
    accept(agg, report("r", 1, rank=1, attempt="a1"))  # both ranks' layouts still in place
    assert rview(agg, "r").latest.missing_ranks == ()


def test_rejections_are_counted_per_run_only_for_runs_the_service_has(real_run):
    agg = real_run
    refuse(agg, report("nobody", 0), "unknown_run")
    refuse(agg, {**report("r", 6, attempt="a1"), "sum_sq": [-1.0, 0.5]}, "invalid")
    assert rview(agg, "r").rejected == {"invalid": 1}
    assert agg.view().rejected == {"unknown_run": 1, "invalid": 1}
    assert [r.name for r in agg.view().runs] == ["r"]


# ---- threads ----------------------------------------------------------------------------------------------
def test_many_threads_on_many_runs_find_what_one_thread_finds():
    def steps(run: str) -> list[dict]:
        return [layout(run)] + [report(run, s, nan=s % 4 == 1) for s in range(12)]

    runs = [f"r{i}" for i in range(6)]
    alone = Aggregator(detector_factory=lambda: {"nonfinite": NonFinite(), "counting": Counting()})
    for run in runs:
        for msg in steps(run):
            accept(alone, msg)
    shared = Aggregator(detector_factory=lambda: {"nonfinite": NonFinite(), "counting": Counting()})
    threads = [threading.Thread(target=lambda run=run: [accept(shared, m) for m in steps(run)]) for run in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    def summary(agg: Aggregator) -> list:
        return [(f.run, f.detector, f.first_step, f.last_step) for run in runs for f in agg.findings(run)]

    assert summary(shared) == summary(alone) and len(summary(alone)) == 3 * len(runs)
    assert all(shared._runs[r].detectors["counting"].seen == 12 for r in runs)
    assert shared.view().accepted == alone.view().accepted == 13 * len(runs)


def test_ingest_scrapes_snapshots_and_reconfiguration_at_once_neither_deadlock_nor_fail():
    """Every entry point from its own thread at the same time, with restarts and evictions (max_runs=3)."""
    agg = Aggregator(AggregatorConfig(max_runs=3, merge_timeout_s=0.01),
                     detector_factory=lambda: {"nonfinite": NonFinite(), "counting": Counting()})
    stop = threading.Event()
    failures: list[BaseException] = []

    def forever(work):
        def loop():
            i = 0
            while not stop.is_set():
                try:
                    work(i)
                except KeyError:  # a run evicted meanwhile
                    pass
                except BaseException as exc:  # reported below
                    failures.append(exc)
                    return
                i += 1
        return threading.Thread(target=loop)

    def ingest(run):
        def work(i):
            if i % 20 == 0:
                agg.submit(layout(run, attempt=f"a{i // 20}"))
            agg.submit(report(run, i % 20, nan=i % 3 == 0, attempt=f"a{i // 20}"))
        return work

    threads = [forever(ingest(f"r{k}")) for k in range(4)]
    threads += [forever(lambda i: agg.view()), forever(lambda i: agg.state_dict()), forever(lambda i: agg.tick()),
                forever(lambda i: agg.findings("r0")), forever(lambda i: agg.flush("r1")),
                forever(lambda i: agg.configure("r2", {"counting": {"enabled": i % 2 == 0}}))]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads), "deadlock"
    assert failures == []
    assert agg.view().accepted > 50 and len(agg.view().runs) <= 3
