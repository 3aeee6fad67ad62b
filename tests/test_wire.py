"""The protocol at the boundary: every message kind and version is told apart, every statistic of the schema
travels, and no input whatever gets anything but a clear rejection."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfservice.service.aggregator import Aggregator
from gfservice.stats import STATISTICS, GradStats
from gfservice.wire import PROTOCOL_VERSION, Layout, Rejected, RejectReason, RunEnd, StepReport, parse


def _report(stats: GradStats, **kw) -> dict:
    return {"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": stats.arrays(), **kw}


def test_every_declared_statistic_travels_and_merges_back():
    rng = np.random.default_rng(0)
    stats = GradStats.from_arrays({"w": rng.normal(size=(4, 3)), "b": np.zeros(4)}, deep=True)
    stats.weight_sq, stats.update_sq = np.array([2.0, 1.0]), np.array([1e-6, 0.0])
    rep = parse(_report(stats))
    assert isinstance(rep, StepReport)
    assert set(rep.stats) == {s.name for s in STATISTICS}
    for s in STATISTICS:
        assert rep.stats[s.name].dtype == np.dtype(s.dtype)
        np.testing.assert_array_equal(rep.stats[s.name], getattr(stats, s.name))


@pytest.mark.parametrize(("message", "reason"), [
    ({"kind": "step", "version": PROTOCOL_VERSION + 1, "run": "r", "rank": 0, "step": 0},
     RejectReason.unsupported_version),
    ({"kind": "telemetry", "run": "r", "rank": 0}, RejectReason.unknown_kind),
    ({"run": "r", "rank": 0, "step": 0}, RejectReason.unknown_kind),
    ({"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": {"count": [1], "sum_sq": [-1.0],
                                                                  "max_abs": [1.0], "nonfinite": [0]}},
     RejectReason.invalid),
    ({"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": {"count": [1.5], "sum_sq": [1.0],
                                                                  "max_abs": [1.0], "nonfinite": [0]}},
     RejectReason.invalid),
    ({"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": {"count": [1], "sum_sq": [1.0],
                                                                  "max_abs": [1.0], "nonfinite": [0],
                                                                  "zeros": [0]}},
     RejectReason.invalid),
    ({"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": {"secret": [1]}}, RejectReason.invalid),
    ({"kind": "step", "run": "r", "rank": 0, "step": 0, "local_norm": float("inf")}, RejectReason.invalid),
    ({"kind": "end", "run": "r", "rank": 0, "extra": 1}, RejectReason.invalid),
])
def test_bad_messages_are_rejected_with_a_reason_that_says_why(message, reason):
    with pytest.raises(Rejected) as info:
        parse(message)
    assert info.value.reason is reason


def test_message_objects_are_validated_like_dicts():
    built = StepReport.model_construct(run="r", rank=0, step=0, time=0.0, stats={"count": np.array([-3])})
    with pytest.raises(Rejected, match="invalid"):
        parse(built)
    assert isinstance(parse(RunEnd(run="r", rank=0)), RunEnd)
    assert isinstance(parse(Layout(run="r", rank=0, world_size=1, layers=["w"], numel=[1], sharded=[False])),
                      Layout)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from(["kind", "version", "run", "rank", "step", "world_size", "layers", "numel", "sharded",
                        "stats", "count", "sum_sq", "loss", "local_norm", "time"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, json_values, max_size=8) | json_values)
def test_no_input_gets_anything_but_a_rejection_or_a_message(message):
    try:
        out = parse(message)
    except Rejected as exc:
        assert isinstance(exc.reason, RejectReason) and str(exc)
    else:
        assert isinstance(out, Layout | StepReport | RunEnd)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.dictionaries(keys, json_values, max_size=8), max_size=12))
def test_the_aggregator_survives_any_stream_and_counts_every_message(messages):
    agg = Aggregator(detector_factory=dict)
    for m in messages:
        agg.submit(m)
    view = agg.view()
    assert view.accepted + sum(view.rejected.values()) == len(messages)
