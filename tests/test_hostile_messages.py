"""Hostile input at the boundary: random and hostile messages, as dicts and as pre-built message objects, go
through ``Aggregator.submit`` and then the exporter, next to a real run with an active finding and a stop
verdict. ``submit`` only ever answers with an ``Ack`` (a rejection carries a ``RejectReason``), every scrape
succeeds with one series per label set, memory stays within its budget, and the real run keeps its series,
its findings and its verdict. One test per hostile input of issue 11 also runs ``promtool check metrics``."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gfservice import registry
from gfservice.config import AggregatorConfig
from gfservice.observability.exporter import GradflowCollector
from gfservice.service.aggregator import Ack, Aggregator
from gfservice.wire import Layout, RejectReason, RunEnd, StepReport
from tests.promtools import promtool_bin, run_tool

NAN, INF = float("nan"), float("inf")
NonFinite = registry.available()["nonfinite"]
LAYERS = ["embed.weight", "blocks.0.weight", "blocks.1.weight", "head.weight"]
GOOD_STEPS = 12
BUDGET = 256 * 1024


def stopping_detectors() -> dict:
    return {"nonfinite": NonFinite(stop_run=True)}


def good_report(step: int, value: float = 1.0, **fields: Any) -> dict:
    n = len(LAYERS)
    return {"kind": "step", "run": "good", "rank": 0, "step": step, "time": 1000.0 + step,
            "stats": {"count": [64] * n, "sum_sq": [value] * n, "max_abs": [value] * n,
                      "nonfinite": [64 if value != value else 0] * n}, **fields}


def service_with_a_real_run() -> Aggregator:
    """A service whose run "good" has healthy steps, then a NaN step: an active finding and a stop verdict."""
    agg = Aggregator(AggregatorConfig(max_memory_bytes=BUDGET, max_runs=50), detector_factory=stopping_detectors)
    assert agg.submit({"kind": "layout", "run": "good", "rank": 0, "world_size": 1, "layers": LAYERS,
                       "numel": [64] * 4, "sharded": [False] * 4}).accepted
    for s in range(GOOD_STEPS - 1):
        assert agg.submit(good_report(s)).accepted
    assert agg.submit(good_report(GOOD_STEPS - 1, NAN)).accepted
    assert agg.should_stop("good")
    return agg


def scrape(agg: Aggregator) -> str:
    reg = CollectorRegistry()
    reg.register(GradflowCollector(agg))
    return generate_latest(reg).decode()


def series(text: str) -> Counter:
    """Every sample of an exposition, by name and label set."""
    return Counter((s.name, tuple(sorted(s.labels.items())))
                   for family in text_string_to_metric_families(text) for s in family.samples)


def assert_real_run_unharmed(agg: Aggregator, text: str) -> None:
    """The real run keeps its verdict, its finding and its series; the scrape has one series per label set."""
    reason = agg.should_stop("good")
    assert reason is not None and reason.startswith("nonfinite")
    assert [(f.detector, f.first_step, f.active) for f in agg.findings("good")] == [("nonfinite", GOOD_STEPS - 1,
                                                                                      True)]
    counts = series(text)
    duplicates = [k for k, n in counts.items() if n > 1]
    assert not duplicates, duplicates[:5]
    names = {(name, dict(labels).get("run")) for name, labels in counts}
    for metric in ("gradflow_finding", "gradflow_last_step", "gradflow_run_finished", "gradflow_grad_norm"):
        assert (metric, "good") in names, metric
    assert agg.run_view("good").finished is False
    view = agg.view()
    assert view.memory_bytes <= BUDGET or len(view.runs) == 1


def assert_promtool_clean(text: str) -> None:
    res = run_tool([promtool_bin(), "check", "metrics"], stdin=text)
    assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr


def submit(agg: Aggregator, message: Any) -> Ack:
    ack = agg.submit(message)
    assert isinstance(ack, Ack)
    assert ack.accepted or isinstance(ack.reason, RejectReason)
    return ack


# ---- one test per hostile input of the issue ----------------------------------------------------------
def junk_layout(**fields: Any) -> dict:
    return {"kind": "layout", "run": "junk", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [4],
            "sharded": [False], **fields}


def junk_report(**fields: Any) -> dict:
    return {"kind": "step", "run": "junk", "rank": 0, "step": 0,
            "stats": {"count": [4], "sum_sq": [1.0], "max_abs": [1.0], "nonfinite": [0]}, **fields}


HOSTILE = {
    "step 10**400": (junk_report(step=10**400), "invalid"),
    "step 2**62": (junk_report(step=2**62), "invalid"),
    "step 2**62 on the real run": (good_report(2**62), "invalid"),
    "surrogate layer name": (junk_layout(layers=["blocks.\ud800.weight"]), "invalid"),
    "control character in a layer name": (junk_layout(layers=["blocks.0\n.weight"]), "invalid"),
    "5,000-character layer name": (junk_layout(layers=["w" * 5000]), "oversized"),
    "300-character layer name": (junk_layout(layers=["w" * 300]), "oversized"),
    "negative sum_sq": (junk_report(stats={"count": [4], "sum_sq": [-1.0], "max_abs": [1.0], "nonfinite": [0]}),
                        "invalid"),
    "negative max_abs": (junk_report(stats={"count": [4], "sum_sq": [1.0], "max_abs": [-1.0], "nonfinite": [0]}),
                         "invalid"),
    "NaN sum_sq without a NaN value": (
        junk_report(stats={"count": [4], "sum_sq": [NAN], "max_abs": [1.0], "nonfinite": [0]}), "invalid"),
    "fractional count": (junk_report(stats={"count": [4.5], "sum_sq": [1.0], "max_abs": [1.0], "nonfinite": [0]}),
                         "invalid"),
    "fractional nonfinite": (
        junk_report(stats={"count": [4], "sum_sq": [NAN], "max_abs": [NAN], "nonfinite": [0.5]}), "invalid"),
    "infinite local norm": (junk_report(local_norm=INF), "invalid"),
    "negative step time": (junk_report(step_time=-1.0), "invalid"),
    "negative numel": (junk_layout(numel=[-4]), "invalid"),
    "world size over the limit": (junk_layout(world_size=10**6), "invalid"),
    "RunEnd from rank 7 of the real run": ({"kind": "end", "run": "good", "rank": 7}, "unknown_rank"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_each_hostile_input_is_refused_and_the_real_run_keeps_everything(name):
    agg = service_with_a_real_run()
    message, reason = HOSTILE[name]
    submit(agg, junk_layout())  # a run for the junk reports to land in
    ack = submit(agg, message)
    assert (ack.accepted, ack.reason) == (False, RejectReason(reason)), name
    assert agg.view().rejected.get(reason, 0) >= 1
    assert submit(agg, good_report(GOOD_STEPS, NAN)).accepted  # the real run goes on: its next step is taken
    text = scrape(agg)
    assert_real_run_unharmed(agg, text)
    assert_promtool_clean(text)


PREBUILT = {
    "step 10**400": lambda: StepReport.model_construct(run="junk", rank=0, step=10**400),
    "negative sum_sq": lambda: StepReport.model_construct(
        run="junk", rank=0, step=1, stats={"count": np.array([4]), "sum_sq": np.array([-1.0]),
                                           "max_abs": np.array([1.0]), "nonfinite": np.array([0])}),
    "fractional count": lambda: StepReport.model_construct(
        run="junk", rank=0, step=1, stats={"count": np.array([4.5]), "sum_sq": np.array([1.0]),
                                           "max_abs": np.array([1.0]), "nonfinite": np.array([0])}),
    "infinite local norm": lambda: StepReport.model_construct(run="junk", rank=0, step=1, local_norm=INF),
    "surrogate layer name": lambda: Layout.model_construct(run="junk", rank=0, world_size=1, layers=["\ud800"],
                                                           numel=[4], sharded=[False]),
    "negative numel": lambda: Layout.model_construct(run="junk", rank=0, world_size=1, layers=["w"], numel=[-4],
                                                     sharded=[False]),
    "RunEnd from rank 7": lambda: RunEnd.model_construct(run="good", rank=7),
    "no run at all": lambda: StepReport.model_construct(rank=0, step=1),
}


@pytest.mark.parametrize("name", list(PREBUILT))
def test_prebuilt_hostile_objects_are_validated_like_dicts(name):
    agg = service_with_a_real_run()
    submit(agg, junk_layout())
    assert not submit(agg, PREBUILT[name]()).accepted
    text = scrape(agg)
    assert_real_run_unharmed(agg, text)


def test_a_message_mutated_after_it_was_validated_is_validated_again():
    agg = service_with_a_real_run()
    submit(agg, junk_layout())
    rep = StepReport(run="junk", rank=0, step=1, stats={"count": [4], "sum_sq": [1.0], "max_abs": [1.0],
                                                        "nonfinite": [0]})
    rep.stats["sum_sq"][0] = -5.0  # the arrays of a frozen model can still be written to
    object.__setattr__(rep, "step", 2**62)
    assert submit(agg, rep).reason is RejectReason.invalid
    assert_real_run_unharmed(agg, scrape(agg))


class _RaisingMapping(Mapping):
    """A mapping whose every method raises (a hostile client's object, as it arrives through Ray)."""

    def __getitem__(self, key: Any) -> Any:
        raise RuntimeError("boom")

    def __iter__(self) -> Any:
        raise RuntimeError("boom")

    def __len__(self) -> int:
        return 1


class _RaisingDict(dict):
    def get(self, key: Any, default: Any = None) -> Any:
        raise RuntimeError("boom")


class _OddVersion:
    def __ne__(self, other: object) -> bool:
        raise RuntimeError("boom")


@pytest.mark.parametrize("message", [_RaisingMapping(), _RaisingDict(kind="step", run="good"),
                                     {"kind": "step", "run": "good", "rank": 0, "step": 1, "version": _OddVersion()},
                                     {"kind": ["step"], "run": "good"}, {1: 2, (3,): "x"}])
def test_hostile_objects_get_a_rejection_not_an_exception(message):
    agg = service_with_a_real_run()
    assert submit(agg, message).reason in (RejectReason.invalid, RejectReason.unknown_kind,
                                           RejectReason.unsupported_version)
    assert_real_run_unharmed(agg, scrape(agg))


# ---- random and hostile messages ------------------------------------------------------------------------
numbers = st.one_of(
    st.integers(-3, 300), st.sampled_from([2**53, 2**62, 2**63 + 1, 10**400, -(2**63)]),
    st.floats(allow_nan=True, allow_infinity=True), st.just(True), st.none(), st.text(max_size=3),
)
names = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), min_size=0, max_size=12),
    st.sampled_from(["w", "\ud800", "a\x00b", "w" * 5000, "x" * 257, "blocks.0.weight"]),
)
arrays = st.one_of(
    st.lists(numbers, min_size=0, max_size=3),
    st.sampled_from([np.array([-1.0]), np.array([NAN]), np.array([INF]), np.array([2**63 + 5], np.uint64),
                     np.array([[1.0]]), np.array(["x"]), np.array([1.5]), np.zeros(3, np.int64)]),
)
stats = st.dictionaries(st.sampled_from(["count", "sum_sq", "max_abs", "nonfinite", "sum_abs", "zeros", "exp_hist",
                                         "dead_units", "weight_sq", "update_sq", "bogus"]), arrays, max_size=6)
runs = st.sampled_from(["junk", "junk-2", "other", "bad name!", ""])
layouts = st.fixed_dictionaries(
    {"kind": st.just("layout"), "run": runs, "rank": numbers, "world_size": numbers},
    optional={"layers": st.lists(names, max_size=3), "numel": st.lists(numbers, max_size=3),
              "sharded": st.lists(st.booleans(), max_size=3), "units": st.lists(numbers, max_size=3),
              "attempt": st.sampled_from(["", "a", "b"]), "version": numbers, "reports_layers": st.booleans()})
reports = st.fixed_dictionaries(
    {"kind": st.just("step"), "run": runs, "rank": numbers, "step": numbers},
    optional={"stats": stats, "time": numbers, "loss": numbers, "lr": numbers, "local_norm": numbers,
              "step_time": numbers, "compute_time": numbers, "skipped": numbers, "extra": numbers,
              "attempt": st.sampled_from(["", "a"])})
ends = st.fixed_dictionaries({"kind": st.sampled_from(["end", "telemetry", None]), "run": runs, "rank": numbers})
plausible = st.builds(  # well-formed messages for the junk runs, so that some get far into the aggregator
    lambda run, rank, step, v, n: [junk_layout(run=run, layers=[f"l{i}" for i in range(n)], numel=[4] * n,
                                               sharded=[False] * n),
                                   {"kind": "step", "run": run, "rank": rank, "step": step,
                                    "stats": {"count": [4] * n, "sum_sq": [v] * n, "max_abs": [v] * n,
                                              "nonfinite": [4 if math.isnan(v) else 0] * n}}],
    runs, st.integers(0, 2), st.integers(0, 5), st.one_of(st.floats(min_value=0), st.just(NAN)), st.integers(1, 40))


def _prebuilt(message: dict) -> Any:
    """The same fields as a message object, built without validation (as a careless client might)."""
    cls = {"layout": Layout, "step": StepReport, "end": RunEnd}.get(message.get("kind"))
    if cls is None:
        return message
    return cls.model_construct(**{k: v for k, v in message.items() if k != "kind"})


messages = st.one_of(layouts, reports, ends, st.just("garbage"), st.just(None), st.integers())
batches = st.lists(st.one_of(messages.map(lambda m: [m]), plausible, messages.map(lambda m: [_prebuilt(m)]
                                                                                    if isinstance(m, dict) else [m])),
                   min_size=1, max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(batches)
def test_random_and_hostile_messages_never_break_submit_the_scrape_or_the_real_run(batch):
    agg = service_with_a_real_run()
    for group in batch:
        for message in group:
            submit(agg, message)
    text = scrape(agg)
    assert_real_run_unharmed(agg, text)
