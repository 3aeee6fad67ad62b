"""The aggregator core: validation of every message, merging of ranks, the findings' lifecycle, isolation of
broken detectors, snapshots, and the stop verdict."""

from __future__ import annotations

import logging
import pickle
import time

import numpy as np
import pytest

from gfservice.api import Detector, DetectorConfig, StepStats
from gfservice.service.aggregator import Aggregator, AggregatorConfig
from gfservice.stats import EXP_BINS, GradStats
from gfservice.wire import MAX_LAYERS
from gfservice_detectors.nonfinite import NonFinite

LAYERS = ["a.weight", "a.bias", "b.weight"]
NAN = float("nan")


def layout(run="good", rank=0, world=1, layers=LAYERS, sharded=None, **kw) -> dict:
    return {"kind": "layout", "run": run, "rank": rank, "world_size": world, "layers": list(layers),
            "numel": [10] * len(layers),
            "sharded": list(sharded) if sharded is not None else [False] * len(layers), **kw}


def report(run="good", rank=0, step=0, sum_sq=(1.0, 0.5, 2.0), nonfinite=None, **kw) -> dict:
    sq = [float(v) for v in sum_sq]
    bad = [0 if np.isfinite(v) else 10 for v in sq] if nonfinite is None else list(nonfinite)
    return {"kind": "step", "run": run, "rank": rank, "step": step, "count": [10] * len(sq), "sum_sq": sq,
            "max_abs": [np.sqrt(v) if np.isfinite(v) else v for v in sq], "nonfinite": bad, **kw}


def from_stats(stats: GradStats, run: str, rank: int, step: int, **kw) -> dict:
    """A step report carrying ``stats`` (computed from real arrays)."""
    return {"kind": "step", "run": run, "rank": rank, "step": step,
            **stats.arrays(), **kw}


def accept(agg: Aggregator, msg) -> tuple:
    ack = agg.submit(msg)
    assert ack.accepted, f"rejected ({ack.reason}): {msg!r:.200}"
    return ack.new_findings


# ---- validation ------------------------------------------------------------------------------------------
@pytest.fixture
def two_runs():
    """An aggregator (small layer limit) with a healthy run 'good' holding an active NaN finding, and a
    two-rank run 'pair' whose rank 1 has not announced itself."""
    agg = Aggregator(AggregatorConfig(max_layers=8), detector_factory=lambda: {"nonfinite": NonFinite()})
    accept(agg, layout())
    accept(agg, report(step=0))
    (found,) = accept(agg, report(step=1, sum_sq=(1.0, NAN, 2.0)))
    assert found.detector == "nonfinite" and found.layers == ["a.bias"]
    accept(agg, layout(run="pair", world=2))
    return agg


def _assert_good_run_unharmed(agg: Aggregator, step: int) -> None:
    active = agg.active_findings("good")
    assert [(f.detector, f.first_step) for f in active] == [("nonfinite", 1)]
    assert not accept(agg, report(step=step, sum_sq=(1.0, NAN, 2.0)))  # still raised, not new
    assert agg.latest("good").step == step


BAD_MESSAGES = {
    "unknown run": (report(run="nobody"), "unknown_run", "no layout for run 'nobody'"),
    "unknown rank": (report(run="pair", rank=1), "unknown_rank", "rank 1 of pair sent no layout"),
    "rank outside the world": (layout(run="pair", rank=2, world=2), "invalid", "outside world size"),
    "too few layers": (report(sum_sq=(1.0, 2.0)), "shape_mismatch", "2 layers, layout has 3"),
    "arrays of different lengths": ({**report(), "max_abs": [1.0, 2.0]}, "invalid", "max_abs has 2 entries"),
    "2-d array": ({**report(), "sum_sq": [[1.0], [2.0], [3.0]]}, "invalid", "expected a 1-d array"),
    "histogram with wrong bins": (
        {**report(), "sum_abs": [1.0] * 3, "zeros": [0] * 3, "exp_hist": np.zeros((3, 10), np.int64)},
        "invalid", f"needs {EXP_BINS} bins"),
    "partial deep statistics": ({**report(), "sum_abs": [1.0] * 3}, "invalid", "deep statistics come together"),
    "text in an array": ({**report(), "sum_sq": ["x", "y", "z"]}, "invalid", "sum_sq"),
    "layout mismatch": (layout(run="pair", rank=1, world=2, layers=["other.weight"]), "layout_mismatch",
                        "rank 1 of pair reports other layers"),
    "duplicate layer names": (layout(run="dup", layers=["w", "w"]), "invalid", "layer names must be unique"),
    "NaN time": (report(time=NAN), "invalid", "time must be finite"),
    "NaN learning rate": (report(lr=NAN), "invalid", "lr must be finite"),
    "infinite loss scale": (report(loss_scale=float("inf")), "invalid", "loss_scale must be finite"),
    "oversized layout": (layout(run="huge", layers=[f"l{i}" for i in range(9)]), "oversized", "9 layers, limit 8"),
    "oversized report": ({**report(), "count": np.zeros(MAX_LAYERS + 1, np.int64)}, "oversized", "over the limit"),
    "negative counts": (report(nonfinite=[0, -1, 0]), "invalid", "counts must not be negative"),
    "negative count": ({**report(), "count": [10, -10, 10]}, "invalid", "counts must not be negative"),
    "NaN count": ({**report(), "count": [10.0, NAN, 10.0]}, "invalid", "counts must be finite"),
    "negative step": (report(step=-1), "invalid", "step"),
    "bad run name": (report(run="my run!"), "invalid", "run"),
    "unexpected field": ({**report(), "colour": "blue"}, "invalid", "colour"),
    "a string": ("garbage", "invalid", "expected a mapping, got str"),
    "a number": (42, "invalid", "expected a mapping, got int"),
    "nothing": (None, "invalid", "expected a mapping, got NoneType"),
    "a list": ([report()], "invalid", "expected a mapping, got list"),
    "bytes": (pickle.dumps(report()), "invalid", "expected a mapping, got bytes"),
    "stale step": (report(step=1), "stale_step", "step 1 of good is already merged"),
}


@pytest.mark.parametrize("case", list(BAD_MESSAGES))
def test_bad_input_is_rejected_with_a_reason_and_counted(two_runs, case, caplog):
    agg = two_runs
    msg, reason, detail = BAD_MESSAGES[case]
    before = dict(agg.view().rejected)
    accepted = agg.accepted
    with caplog.at_level(logging.DEBUG, logger="gfservice.service.aggregator"):
        ack = agg.submit(msg)
    assert (ack.accepted, ack.reason, ack.new_findings) == (False, reason, ())
    assert agg.view().rejected[reason] == before.get(reason, 0) + 1
    assert agg.accepted == accepted
    assert any(detail in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert {r["run"] for r in agg.runs()} == {"good", "pair"}  # no run appeared or vanished
    _assert_good_run_unharmed(agg, step=2)


def test_duplicate_report_of_a_waiting_step(two_runs):
    agg = two_runs
    accept(agg, layout(run="pair", rank=1, world=2))
    accept(agg, report(run="pair", rank=0, step=0))
    ack = agg.submit(report(run="pair", rank=0, step=0))
    assert (ack.accepted, ack.reason) == (False, "duplicate")
    accept(agg, report(run="pair", rank=1, step=0))
    assert agg.latest("pair").step == 0
    assert agg.submit(report(run="pair", rank=1, step=0)).reason == "stale_step"
    assert agg.view().rejected == {"duplicate": 1, "stale_step": 1}


def test_non_finite_gradient_values_are_data_not_errors(two_runs):
    """NaN/Inf in the gradient sums is what the nonfinite detector is for: such reports are accepted."""
    agg = two_runs
    accept(agg, report(step=2, sum_sq=(float("inf"), NAN, 1.0), loss=NAN))
    assert {f.key for f in agg.active_findings("good")} == {"grad", "loss"}


def test_a_barrage_of_bad_input_never_breaks_the_other_run(two_runs):
    agg = two_runs
    step = 2
    for case, (msg, reason, _) in BAD_MESSAGES.items():
        if case == "stale step":
            msg = report(step=step - 1)
        ack = agg.submit(msg)
        assert (ack.accepted, ack.reason) == (False, reason), case
        _assert_good_run_unharmed(agg, step)
        step += 1
    assert sum(agg.view().rejected.values()) == len(BAD_MESSAGES)
    assert [f.first_step for f in agg.findings("good")] == [1]
    assert agg.run_view("good").findings_total == {("nonfinite", "critical"): 1}


# ---- merging ranks ---------------------------------------------------------------------------------------
def test_two_sharded_ranks_merge_into_the_whole_gradient():
    """FSDP-like: 'w' is sharded (each rank holds half), 'b' is replicated (counted once)."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4)) * 1e-2
    b = rng.normal(size=4)
    whole = GradStats.from_arrays({"w": w, "b": b}, deep=True)
    agg = Aggregator(detector_factory=lambda: {"nonfinite": NonFinite()})
    for rank in (0, 1):
        accept(agg, layout(run="fsdp", rank=rank, world=2, layers=["w", "b"], sharded=[True, False]))
    halves = np.split(w, 2)
    for rank in (0, 1):
        part = GradStats.from_arrays({"w": halves[rank], "b": b}, deep=True)
        accept(agg, from_stats(part, "fsdp", rank, 0, local_norm=part.global_norm, step_time=0.1 * (rank + 1)))
        if rank == 0:
            assert agg.latest("fsdp") is None  # waits for rank 1
    merged = agg.latest("fsdp")
    assert merged.step == 0 and merged.missing_ranks == ()
    g = merged.grads
    assert g.layers == ("w", "b")
    np.testing.assert_array_equal(g.count, [32, 4])
    np.testing.assert_allclose(g.sum_sq, whole.sum_sq, rtol=1e-12)
    np.testing.assert_array_equal(g.max_abs, whole.max_abs)
    np.testing.assert_allclose(g.sum_abs, whole.sum_abs, rtol=1e-12)
    np.testing.assert_array_equal(g.exp_hist, whole.exp_hist)
    assert merged.rank_norm.shape == (2,) and np.isfinite(merged.rank_norm).all()
    np.testing.assert_allclose(merged.step_time, [0.1, 0.2])
    assert agg.counters()["layer_stats_merged"] == 4


def test_ddp_heartbeat_rank_names_the_rank_with_nan():
    """DDP: rank 0 reports the (reduced) layers, rank 1 only a heartbeat with its local state."""
    agg = Aggregator(detector_factory=lambda: {"nonfinite": NonFinite()})
    accept(agg, layout(run="ddp", rank=0, world=2))
    accept(agg, layout(run="ddp", rank=1, world=2, layers=[], sharded=[], reports_layers=False))
    accept(agg, report(run="ddp", rank=0, step=0, local_norm=1.0))
    accept(agg, {"kind": "step", "run": "ddp", "rank": 1, "step": 0, "local_norm": 1.1})
    accept(agg, report(run="ddp", rank=0, step=1, sum_sq=(NAN, NAN, NAN), local_norm=1.0))
    (f,) = accept(agg, {"kind": "step", "run": "ddp", "rank": 1, "step": 1, "local_nonfinite": True})
    assert f.step == 1 and f.ranks == [1] and "from rank 1" in f.message
    assert agg.submit(report(run="ddp", rank=1, step=2)).reason == "shape_mismatch"  # a heartbeat has no layers


def test_missing_rank_is_merged_without_after_the_timeout():
    agg = Aggregator(AggregatorConfig(merge_timeout_s=0.05), detector_factory=lambda: {"nonfinite": NonFinite()})
    for rank in range(3):
        accept(agg, layout(run="slow", rank=rank, world=3, sharded=[True] * 3))
    accept(agg, report(run="slow", rank=0, step=0))
    accept(agg, report(run="slow", rank=2, step=0, sum_sq=(NAN, 1.0, 1.0)))
    assert agg.tick() == [] and agg.latest("slow") is None  # not overdue yet
    time.sleep(0.1)
    (f,) = agg.tick()
    merged = agg.latest("slow")
    assert merged.step == 0 and merged.missing_ranks == (1,)
    assert merged.grads.count.tolist() == [20, 20, 20]  # two shards of three
    assert f.detector == "nonfinite" and f.first_step == 0
    assert agg.submit(report(run="slow", rank=1, step=0)).reason == "stale_step"  # too late: counted, dropped


def test_a_crowd_of_waiting_steps_and_flush_merge_without_the_missing_rank():
    agg = Aggregator(AggregatorConfig(max_pending_steps=2), detector_factory=lambda: {})
    for rank in range(2):
        accept(agg, layout(run="r", rank=rank, world=2))
    for step in range(3):
        accept(agg, report(run="r", rank=0, step=step))
    assert [s.step for s in agg.history("r")] == [0]  # three waiting steps: the oldest went without rank 1
    assert agg.history("r")[0].missing_ranks == (1,)
    agg.flush("r")
    assert [s.step for s in agg.history("r")] == [0, 1, 2]


# ---- findings' lifecycle ---------------------------------------------------------------------------------
class Flag(Detector):
    """Raises a warning while the loss is above a limit; does not judge steps without a loss."""

    name = "flag"

    class Config(DetectorConfig):
        limit: float = 1.0

    def update(self, step: StepStats):
        if step.loss is None:
            return None
        if step.loss > self.config.limit:
            return [self.finding(step, "warning", f"loss {step.loss} is high", value=step.loss,
                                 threshold=self.config.limit)]
        return []


class Broken(Detector):
    """Raises a finding at step 0, then fails on every later step."""

    name = "broken"

    def update(self, step: StepStats):
        if step.step == 0:
            return [self.finding(step, "info", "first step")]
        raise RuntimeError("bug in a plugin")


def _flag_run(losses, factory=lambda: {"flag": Flag()}):
    agg = Aggregator(detector_factory=factory)
    accept(agg, layout(run="r"))
    news = [accept(agg, report(run="r", step=i, loss=v)) for i, v in enumerate(losses)]
    return agg, news


def test_finding_lifecycle_first_last_cleared_and_not_repeated():
    agg, news = _flag_run([0.0, 0.0, 2.0, 3.0, 2.5])
    assert [len(n) for n in news] == [0, 0, 1, 0, 0]  # new once, not again while active
    (active,) = agg.active_findings("r")
    assert (active.first_step, active.last_step, active.active) == (2, 4, True)
    assert active.value == 2.5  # the latest raise's value
    accept(agg, report(run="r", step=5, loss=0.0))
    assert agg.active_findings("r") == []
    (again,) = accept(agg, report(run="r", step=6, loss=5.0))  # raised again: a new finding
    assert (again.first_step, again.last_step) == (6, 6)
    assert [f.first_step for f in agg.findings("r")] == [2, 6]
    assert [f.first_step for f in agg.findings("r", since_step=3)] == [6]
    assert agg.run_view("r").findings_total == {("flag", "warning"): 2}


def test_findings_log_follows_the_lifecycle():
    """What findings() returns (the log) agrees with the active set once a finding clears."""
    agg, _ = _flag_run([0.0, 2.0, 2.0, 2.0, 0.0])
    (f,) = agg.findings("r")
    assert (f.first_step, f.last_step, f.active) == (1, 3, False)
    assert agg.findings("r", active_only=True) == []


def test_a_detector_that_does_not_judge_a_step_keeps_its_findings():
    agg, _ = _flag_run([2.0, 2.0, None, None, 2.0])
    (f,) = agg.active_findings("r")
    assert (f.first_step, f.last_step) == (0, 4)
    assert len(agg.findings("r")) == 1


def test_a_detector_that_raises_is_isolated_and_counted(caplog):
    factory = lambda: {"broken": Broken(), "nonfinite": NonFinite(), "flag": Flag()}  # noqa: E731
    with caplog.at_level(logging.ERROR, logger="gfservice.service.aggregator"):
        agg, news = _flag_run([0.0, 2.0, 2.0, 0.0], factory=factory)
        (nan,) = accept(agg, report(run="r", step=4, sum_sq=(1.0, NAN, 1.0), loss=0.0))
    assert [[f.detector for f in n] for n in news] == [["broken"], ["flag"], [], []]
    assert nan.detector == "nonfinite"
    state = agg.run_view("r")
    assert state.detector_errors == {"broken": 4}
    assert {f.detector for f in agg.active_findings("r")} == {"broken", "nonfinite"}  # its finding stays
    assert any("detector broken failed on run r step 1" in r.getMessage() for r in caplog.records)
    # other runs of the same service are untouched
    accept(agg, layout(run="other"))
    assert accept(agg, report(run="other", step=0, loss=3.0))[0].detector in ("broken", "flag")
    assert agg.counters()["rejected"] == {}


# ---- snapshots -------------------------------------------------------------------------------------------
def _steps(n: int, seed: int = 0):
    """Healthy steps of 6 layers; layers 0-1 vanish from step 5; the global norm spikes at step 30."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        sq = np.exp(rng.normal(0, 0.1, 6)) * 1e-2
        if i >= 5:
            sq[:2] = 1e-14
        if i == 30:
            sq *= 1e4
        out.append(report(run="r", step=i, sum_sq=sq, nonfinite=[0] * 6, loss=1.0, lr=0.1))
    return out


def test_state_dict_round_trip_resumes_without_repeating_findings():
    six = [f"l{i}" for i in range(6)]
    steps = _steps(40)
    first = Aggregator()  # the installed detectors, default settings
    accept(first, layout(run="r", layers=six))
    before = [f for s in steps[:20] for f in accept(first, s)]
    assert [(f.detector, f.first_step, f.layers) for f in before] == [("vanishing", 14, ["l0", "l1"])]

    state = pickle.loads(pickle.dumps(first.state_dict()))
    resumed = Aggregator()
    resumed.load_state_dict(state)
    assert resumed.should_stop("r") is None
    assert resumed.submit(steps[19]).reason == "stale_step"  # knows where the run was
    assert [(f.detector, f.first_step) for f in resumed.active_findings("r")] == [("vanishing", 14)]

    after_a = [f for s in steps[20:] for f in accept(first, s)]
    after_b = [f for s in steps[20:] for f in accept(resumed, s)]  # no layout resent
    assert [(f.detector, f.key, f.first_step) for f in after_b] == [("exploding", "spike", 30)]
    assert [f.model_dump(exclude={"time"}) for f in after_b] == [f.model_dump(exclude={"time"}) for f in after_a]
    assert resumed.run_view("r").findings_total == first.run_view("r").findings_total
    assert [(f.detector, f.first_step) for f in resumed.findings("r")] == [("vanishing", 14), ("exploding", 30)]
    assert resumed.counters()["accepted"] == first.counters()["accepted"]


# ---- stop verdict ----------------------------------------------------------------------------------------
def test_stop_run_sets_the_verdict():
    agg = Aggregator(detector_settings={"nonfinite": {"stop_run": True}})
    plain = Aggregator()
    for a in (agg, plain):
        accept(a, layout(run="r"))
        accept(a, report(run="r", step=0))
    assert agg.should_stop("r") is None
    for a in (agg, plain):
        accept(a, report(run="r", step=1, sum_sq=(NAN, 1.0, 1.0)))
    reason = agg.should_stop("r")
    assert reason is not None and reason.startswith("nonfinite: non-finite gradients")
    assert plain.should_stop("r") is None
    accept(agg, report(run="r", step=2))  # the finding clears; the verdict stands
    assert agg.should_stop("r") == reason
    assert agg.should_stop("unknown") is None
    assert [r["stop_reason"] for r in agg.runs()] == [reason]
    restored = Aggregator()
    restored.load_state_dict(agg.state_dict())
    assert restored.should_stop("r") == reason


def test_reading_a_live_jobs_history_does_not_merge_steps_whose_ranks_are_on_their_way():
    """monitor.history() on rank 0 of a torchrun job reads its in-process aggregator while the other ranks'
    reports (and its own, over its socket) are still travelling: those steps stay pending, not merged without
    their ranks (which made `stalled_rank` page on a healthy job with fast steps)."""
    from gfservice.training.transport import merged_steps

    agg = Aggregator()
    for rank in (0, 1):
        agg.submit({"kind": "layout", "run": "live", "rank": rank, "world_size": 2, "layers": ["w"], "numel": [4],
                    "sharded": [False]})

    def report(rank: int, step: int) -> None:
        agg.submit({"kind": "step", "run": "live", "rank": rank, "step": step,
                    "stats": {"count": [4], "sum_sq": [1.0], "max_abs": [0.5], "nonfinite": [0]}})

    for step in range(4):
        report(1, step)
    for step in range(2):
        report(0, step)
    assert [s.step for s in merged_steps(agg, "live")] == [0, 1]
    for step in (2, 3):
        report(0, step)
    steps = merged_steps(agg, "live")
    assert [s.step for s in steps] == [0, 1, 2, 3] and all(not s.missing_ranks for s in steps)
    agg.flush("live")  # the aggregator's own flush still merges what waits, missing ranks or not
