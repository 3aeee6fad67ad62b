"""Clock steps and suspensions: every stall, idle, finish and time-to-live decision of the aggregator and the
service core runs on the monotonic clock; the wall clock only stamps (issue 22). Both clocks are injected."""

from __future__ import annotations

import pytest

from gfservice.service.aggregator import Aggregator, AggregatorConfig
from gfservice.service.core import ServiceCore

HOUR = 3600.0
NAN = float("nan")


class Clocks:
    """A wall clock and a monotonic clock the test moves: apart (a wall step) or together (a suspension)."""

    def __init__(self) -> None:
        self.wall = 1.7e9
        self.mono = 5_000.0

    def step_wall(self, seconds: float) -> None:
        self.wall += seconds

    def suspend(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    def aggregator(self, **config) -> Aggregator:
        return Aggregator(AggregatorConfig(**config), clock=lambda: self.wall, monotonic=lambda: self.mono)


def layout(rank: int, world: int = 2) -> dict:
    return {"kind": "layout", "run": "r", "rank": rank, "world_size": world, "layers": ["w"], "numel": [4],
            "sharded": [False], "attempt": "a1"}


def report(rank: int, step: int, value: float = 1.0) -> dict:
    return {"kind": "step", "run": "r", "rank": rank, "step": step, "attempt": "a1",
            "stats": {"count": [4], "sum_sq": [value], "max_abs": [value], "nonfinite": [4 if value != value else 0]}}


def start(clocks: Clocks, world: int = 2, **config) -> Aggregator:
    agg = clocks.aggregator(**config)
    for rank in range(world):
        assert agg.submit(layout(rank, world)).accepted
    return agg


@pytest.mark.parametrize("jump", [60.0, -60.0, 7 * HOUR, -7 * HOUR])
def test_a_wall_clock_step_between_two_ranks_reports_changes_nothing(jump):
    clocks = Clocks()
    agg = start(clocks)
    for step in range(3):
        assert agg.submit(report(0, step)).accepted
        clocks.step_wall(jump)  # NTP, or a VM's clock set right, while rank 1 computes the step
        agg.tick()
        assert agg.submit(report(1, step)).accepted, "an on-time report of a healthy rank is refused"
        agg.tick()
    latest = agg.latest("r")
    assert latest is not None and latest.step == 2 and latest.missing_ranks == ()
    run = agg.run_view("r")
    assert not run.finished and not run.active
    assert not [f for f in agg.findings("r") if f.detector == "stalled_rank"]


@pytest.mark.parametrize("jump", [7 * HOUR, -7 * HOUR])
def test_a_wall_clock_step_neither_finishes_nor_forgets_a_live_run(jump):
    clocks = Clocks()
    agg = start(clocks, world=1)
    assert agg.submit(report(0, 0, NAN)).accepted  # an active finding that must outlive the clock step
    clocks.step_wall(jump)
    for minute in range(1, 130):  # two hours of ticks after the step; the run reports every minute
        clocks.mono += 60
        clocks.wall += 60
        agg.tick()
        assert agg.submit(report(0, minute)).accepted
    run = agg.run_view("r")
    assert not run.finished
    assert [f.detector for f in agg.findings("r")] == ["nonfinite"]


def test_a_suspension_past_the_idle_limit_and_a_resume_keep_the_run_and_its_findings():
    clocks = Clocks()
    agg = start(clocks)
    assert agg.submit(report(0, 0, NAN)).accepted
    assert agg.submit(report(1, 0, NAN)).accepted
    clocks.suspend(6.5 * HOUR)  # the whole VM: wall and monotonic clocks jump on resume
    agg.tick()  # the service's ticker may run before the job's first report after the resume
    for step in range(1, 90):  # then the job reports again, a step a minute, for an hour and a half
        for rank in (0, 1):
            assert agg.submit(report(rank, step)).accepted
        clocks.suspend(60)
        agg.tick()
        assert not agg.run_view("r").finished, "a run that reports is live"
    assert "r" in {r.name for r in agg.view().runs}
    assert "nonfinite" in [f.detector for f in agg.findings("r")]
    assert agg.view().evicted == {}


def test_a_run_silent_past_the_idle_limit_finishes_then_is_forgotten_on_the_monotonic_clock():
    clocks = Clocks()
    agg = start(clocks, world=1, idle_finish_s=600, finished_ttl_s=60)
    assert agg.submit(report(0, 0)).accepted
    clocks.step_wall(10 * HOUR)  # the wall clock alone decides nothing
    agg.tick()
    assert not agg.run_view("r").finished
    clocks.mono += 601
    agg.tick()
    assert agg.run_view("r").finished
    clocks.mono += 30
    agg.tick()
    assert agg.submit(report(0, 1)).accepted  # it sends again: live, and its time to live starts over
    assert not agg.run_view("r").finished
    agg.tick()
    clocks.mono += 601
    agg.tick()
    agg.tick()  # first seen finished: the time to live runs from here
    clocks.mono += 61
    agg.tick()
    assert "r" not in {r.name for r in agg.view().runs}
    assert agg.view().evicted == {"finished_ttl": 1}


def test_finished_only_when_every_rank_ended():
    clocks = Clocks()
    agg = start(clocks)
    assert agg.submit({"kind": "end", "run": "r", "rank": 0, "attempt": "a1"}).accepted
    assert not agg.run_view("r").finished
    assert agg.submit({"kind": "end", "run": "r", "rank": 1, "attempt": "a1"}).accepted
    assert agg.run_view("r").finished


def test_a_pending_step_waits_its_merge_timeout_on_the_monotonic_clock():
    clocks = Clocks()
    agg = start(clocks, merge_timeout_s=30)
    assert agg.submit(report(0, 0)).accepted
    clocks.step_wall(3600)
    agg.tick()
    assert agg.latest("r") is None
    clocks.mono += 31
    agg.tick()
    latest = agg.latest("r")
    assert latest is not None and latest.missing_ranks == (1,)


def test_the_core_takes_both_clocks(tmp_path):
    clocks = Clocks()
    core = ServiceCore({"service": {"state_dir": str(tmp_path), "metrics_port": None}},
                       clock=lambda: clocks.wall, monotonic=lambda: clocks.mono)
    try:
        clocks.step_wall(-7 * HOUR)
        clocks.mono += 12
        assert core.status().uptime_s == pytest.approx(12)
        assert core.submit([layout(0, 1), report(0, 0)]).plain()["rejected"] == []
        clocks.step_wall(7 * HOUR)
        core.aggregator.tick()
        assert not core.aggregator.run_view("r").finished
    finally:
        core.shutdown()
