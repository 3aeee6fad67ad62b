"""A service that always starts (issue 22): real snapshots mutated in types, nesting and sizes never stop the
service from starting nor lock a run out (anything unusable is set aside and counted), and a full or read-only
state disk (a real small tmpfs) never stops it from starting (counted, exported)."""

from __future__ import annotations

import contextlib
import copy
import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from gfservice.hosting.actor import ServiceHost
from gfservice.observability.exporter import ExporterConfig, GradflowCollector
from gfservice.service.core import ServiceCore

RUN = "saved"


def _settings(state_dir: Path, **service) -> dict:
    return {"service": {"state_dir": str(state_dir), "metrics_port": None, "tick_interval_s": 60,
                        "snapshot_interval_s": 60, **service}}


def _layout(attempt: str) -> dict:
    return {"kind": "layout", "run": RUN, "rank": 0, "world_size": 1, "layers": ["a", "b"], "numel": [2, 2],
            "sharded": [False, False], "attempt": attempt}


def _report(step: int, attempt: str, value: float = 1.0) -> dict:
    bad = value != value
    return {"kind": "step", "run": RUN, "rank": 0, "step": step, "attempt": attempt,
            "stats": {"count": [2, 2], "sum_sq": [value, 1.0], "max_abs": [value, 1.0],
                      "nonfinite": [2 if bad else 0, 0]}}


@pytest.fixture(scope="module")
def saved_document(tmp_path_factory) -> dict:
    """A real snapshot document: a run with findings, layouts, detector state and counters."""
    d = tmp_path_factory.mktemp("saved")
    core = ServiceCore(_settings(d))
    attempt = "a" + uuid.uuid4().hex[:8]
    core.submit([_layout(attempt), *(_report(s, attempt) for s in range(5)), _report(5, attempt, float("nan"))])
    core.configure(RUN, {"nonfinite": {"stop_run": True}})
    core.shutdown()
    return json.loads((d / "snapshot.json").read_text())


def _paths(node, path=()):
    """Every path into ``node`` (plain JSON)."""
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*path, i))


def _deep(depth: int):  # nested past the limits (a snapshot file nested past the stack: test_snapshot_state)
    out: object = 1
    for _ in range(depth):
        out = {"x": [out]}
    return out


junk = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.text(max_size=20), st.just("x" * 200_000), st.lists(st.integers(), max_size=5),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3), st.integers(50, 400).map(_deep),
    st.just({"__ndarray__": "<f8", "shape": [3], "data": "AAAA"}), st.just({"__tuple__": 5}),
    st.just({"__dict__": [[1]]}), st.just({"__set__": [[1]]}),
)


def _starts_and_takes_the_run(state_dir: Path) -> ServiceCore:
    core = ServiceCore(_settings(state_dir))
    try:
        core.status()
        attempt = "b" + uuid.uuid4().hex[:8]  # the job starts again: its reports must be taken
        answer = core.submit([_layout(attempt), _report(0, attempt), _report(1, attempt)]).plain()
        assert answer["rejected"] == [], answer
        reg = CollectorRegistry()
        reg.register(GradflowCollector(core.aggregator, ExporterConfig()))
        assert f'run="{RUN}"' in generate_latest(reg).decode(), "the run is on /metrics"
        core.aggregator.tick()
        core.aggregator.flush()
    except BaseException:
        core.shutdown()
        raise
    return core


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_a_mutated_real_snapshot_never_stops_the_service_nor_locks_the_run_out(saved_document, tmp_path_factory,
                                                                               data):
    doc = copy.deepcopy(saved_document)
    paths = list(_paths(doc["state"]))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(paths), label="path")
        value = data.draw(junk, label="value")
        if not path:
            doc["state"] = value
            break
        with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier mutation took the path away
            parent = doc["state"]
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = value
    d = tmp_path_factory.mktemp("mutated")
    (d / "snapshot.json").write_text(json.dumps(doc))
    os.chmod(d / "snapshot.json", 0o600)
    core = _starts_and_takes_the_run(d)
    try:  # refused whole: set aside, kept for inspection, counted
        assert core.snapshots_set_aside == len(list(d.glob("snapshot.corrupt-*.json"))) <= 1
        state = doc["state"]
        assert core.restored or core.snapshots_set_aside or (isinstance(state, dict) and not state.get("runs"))
    finally:
        core.shutdown()


@pytest.mark.parametrize("field, value", [("attempts", [1, 2]), ("attempt", 7), ("ended", ["x"]),
                                          ("rejected", {"a": "b"}), ("last_step", [5]), ("world_size", 0),
                                          ("layouts", [{"table": "0"}]), ("findings_total", [["a", "b"]])])
def test_a_wrong_type_in_one_field_is_set_aside_not_loaded(saved_document, tmp_path, field, value):
    doc = copy.deepcopy(saved_document)
    doc["state"]["runs"][RUN][field] = value
    (tmp_path / "snapshot.json").write_text(json.dumps(doc))
    core = _starts_and_takes_the_run(tmp_path)
    try:
        assert core.restored == 0 and core.snapshots_set_aside == 1
        assert core.status().counters["snapshots_set_aside"] == 1
    finally:
        core.shutdown()


# ---- a full or read-only state disk ----------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB tmpfs (needs root and mount); unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here ({exc}); run as root where mount is permitted")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True, timeout=30)


def _fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_a_full_state_disk_never_stops_the_service_from_starting(small_disk, caplog):
    state = small_disk / "state"
    state.mkdir(mode=0o700)
    _fill(small_disk)
    host = ServiceHost(_settings(state, metrics_port=0, sd_file=str(state / "prometheus-sd.json")))
    try:
        assert host.metrics_port, "/metrics is served"
        assert host.snapshot_failures >= 1, "the discovery file's ENOSPC is counted"
        assert "cannot write the discovery file" in caplog.text
        assert host.submit([_layout("a1"), _report(0, "a1")]).plain()["rejected"] == []
        assert host.snapshot() is False and host.snapshot_health().failures >= 2
    finally:
        host.shutdown()


def test_a_read_only_state_disk_never_stops_the_service_from_starting(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True, capture_output=True, timeout=30)
    state = small_disk / "missing" / "state"  # cannot even be created
    host = ServiceHost(_settings(state, metrics_port=0, sd_file=str(state / "prometheus-sd.json")))
    try:
        assert host.snapshot_failures >= 2  # the directory, then the discovery file
        assert host.submit([_layout("a1"), _report(0, "a1")]).plain()["rejected"] == []
        assert host.snapshot() is False
    finally:
        host.shutdown()
