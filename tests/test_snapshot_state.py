"""The saved state as a typed model: validated as a whole before anything is restored, bounded in nesting and
size, readable from disk without ever recursing past the stack; and the bounded logs that account their bytes."""

from __future__ import annotations

import pydantic
import pytest

from gfservice.service import state as st
from gfservice.service.aggregator import Aggregator
from gfservice.service.memory import BoundedLog, Ledger, RunMemory
from gfservice.wire import SNAPSHOT_MAX_DEPTH, DisableReason, EvictionReason, SnapshotState, check_nesting


def _nested(depth: int) -> dict:
    node: dict = {}
    for _ in range(depth):
        node = {"x": node}
    return node


def _saved_run() -> dict:
    agg = Aggregator()
    agg.submit({"kind": "layout", "run": "r", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [4],
                "sharded": [False]})
    agg.submit({"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": {"count": [4], "sum_sq": [float("nan")],
                "max_abs": [float("nan")], "nonfinite": [4]}})
    return agg.state_dict()


def test_a_saved_state_validates_as_a_snapshot_state_and_restores():
    state = _saved_run()
    model = SnapshotState.model_validate(state)
    assert set(model.runs) == {"r"} and [f.detector for f in model.runs["r"].log] == ["nonfinite"]
    restored = Aggregator()
    restored.load_state_dict(model)
    assert [f.detector for f in restored.active_findings("r")] == ["nonfinite"]


@pytest.mark.parametrize("depth", [SNAPSHOT_MAX_DEPTH + 1, 50_000])
def test_a_deeply_nested_state_is_a_clean_validation_error_and_nothing_is_taken(depth):
    state = _saved_run()
    state["runs"]["r"]["detectors"]["exploding"] = _nested(depth)
    agg = Aggregator()
    with pytest.raises(pydantic.ValidationError, match="nested more than"):
        agg.load_state_dict(state)
    assert agg.runs() == []


def test_a_broken_run_refuses_the_whole_state():
    state = _saved_run()
    state["runs"]["broken"] = {"world_size": 1}
    state["runs"]["bad-table"] = {**state["runs"]["r"], "layouts": [{"run": "bad-table", "table": 7}]}
    agg = Aggregator()
    with pytest.raises(pydantic.ValidationError) as err:
        agg.load_state_dict(state)
    assert "broken.layouts" in str(err.value) and "layer table 7" in str(err.value)
    assert agg.runs() == []


def test_too_many_items_are_refused():
    with pytest.raises(ValueError, match="more than 10 items"):
        check_nesting({"a": list(range(11))}, max_items=10)


def test_a_snapshot_file_nested_past_the_stack_is_a_snapshot_error(tmp_path):
    d = tmp_path / "state"
    st.ensure_private_dir(d)
    deep_state = '{"format": "gfservice-snapshot", "version": 1, "state": ' + '{"a": ' * 500 + "1" + "}" * 501
    for text in ("[" * 100_000 + "]" * 100_000, deep_state):
        path = d / "snapshot.json"
        path.write_text(text)
        with pytest.raises(st.SnapshotError):
            st.read_snapshot(path)


def test_a_detector_state_too_deep_to_restore_is_not_saved(caplog):
    class Deep:
        def __init__(self, config=None):
            from gfservice.api import DetectorConfig
            self.config = DetectorConfig()

        def update(self, stats):
            return None

        def state_dict(self):
            return _nested(SNAPSHOT_MAX_DEPTH)

        def load_state_dict(self, state):
            pass

    agg = Aggregator(detector_factory=lambda: {"deep": Deep()})
    agg.submit({"kind": "layout", "run": "r", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [4],
                "sharded": [False]})
    state = agg.state_dict()
    assert state["runs"]["r"]["detectors"] == {}
    Aggregator(detector_factory=lambda: {"deep": Deep()}).load_state_dict(state)  # the rest restores


def test_reasons_are_str_enums_with_their_label_values():
    assert [r.value for r in EvictionReason] == ["finished_ttl", "memory", "max_runs"]
    assert [r.value for r in DisableReason] == ["errors", "time"]
    assert EvictionReason.memory == "memory"


def test_every_way_out_of_a_bounded_log_is_accounted():
    ledger = Ledger()
    mem = RunMemory(ledger, detectors=0)
    log = BoundedLog(mem, "findings", len, maxlen=3)
    log.extend(["aa", "bbb", "c", "dddd"])  # "aa" dropped at the bound
    assert list(log) == ["bbb", "c", "dddd"] and mem.findings == 8
    assert log.popleft() == "bbb" and mem.findings == 5
    log.clear()
    assert mem.findings == 0 and not log and ledger.total == mem.total
    for name in ("pop", "appendleft", "remove", "insert", "rotate", "__setitem__", "__delitem__", "__iadd__"):
        assert not hasattr(log, name), f"{name} would bypass the byte accounting"
