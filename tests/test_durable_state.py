"""The service's private, durable state under chaos: planted pickles, directories others own or can write,
truncated and corrupt snapshots, a state directory that breaks mid-run, a Ray actor killed while it writes.

Plain-Python :class:`ServiceHost` tests (fast), plus one real-Ray test with its own short-lived actor.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import stat
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from gfservice.config import Settings
from gfservice.hosting.actor import ServiceHost
from gfservice.service import state as st
from gfservice.service.aggregator import Aggregator


def _settings(state_dir: Path, **service) -> dict:
    return {"service": {"state_dir": str(state_dir), "metrics_port": None, "tick_interval_s": 0.05,
                        "snapshot_interval_s": 0.1, **service}}


def _run(core: ServiceHost, run: str, steps: range, nan_at: tuple[int, ...] = ()) -> None:
    lay = {"kind": "layout", "run": run, "rank": 0, "world_size": 1, "layers": ["w"], "numel": [2],
           "sharded": [False]}
    core.submit([lay])
    for s in steps:
        bad = s in nan_at
        ans = core.submit([{"kind": "step", "run": run, "rank": 0, "step": s, "count": [2],
                            "sum_sq": [float("nan") if bad else 1.0], "max_abs": [1.0], "nonfinite": [int(bad)]}])
        assert ans.rejected == []


def _idents(core: ServiceHost, run: str) -> list[tuple]:
    return [(f.detector, f.key, f.first_step) for f in core.findings(run)]


def _wait(pred, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


class Boom:
    """A pickle that runs code when loaded: it makes a directory (the marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


# ---- the directory ---------------------------------------------------------------------------------
def test_default_state_dir_is_private_and_not_in_tmp(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = Settings().service
    assert cfg.state_dir == str(tmp_path / ".local/state/gfservice")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    cfg = Settings().service
    assert cfg.snapshot_path == str(tmp_path / "xdg/gfservice/snapshot.json")
    assert cfg.sd_file == str(tmp_path / "xdg/gfservice/prometheus-sd.json")
    core = ServiceHost(Settings(service={"metrics_port": None}))
    core.shutdown()
    assert stat.S_IMODE(os.stat(tmp_path / "xdg/gfservice").st_mode) == 0o700
    assert json.loads((tmp_path / "xdg/gfservice/snapshot.json").read_text())["format"] == st.FORMAT


@pytest.mark.parametrize("how", ["group-writable", "other-writable", "other-owner", "symlink", "sd-parent"])
def test_a_state_dir_others_control_is_refused_with_a_clear_error(tmp_path, how):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    extra = {}
    if how == "group-writable":
        os.chmod(d, 0o770)
        want = "writable by group or others"
    elif how == "other-writable":
        os.chmod(d, 0o707)
        want = "writable by group or others"
    elif how == "other-owner":
        if os.geteuid() != 0:
            pytest.skip("needs root to give the directory away")
        os.chown(d, 12345, -1)
        want = "owned by uid 12345, not by this user"
    elif how == "symlink":
        real, d = d, tmp_path / "link"
        d.symlink_to(real)
        want = "is a symlink"
    else:  # an explicit discovery file's directory is checked the same way
        (tmp_path / "shared").mkdir()
        os.chmod(tmp_path / "shared", 0o777)
        extra = {"sd_file": str(tmp_path / "shared/sd.json")}
        want = "shared is writable by group or others"
    with pytest.raises(st.StateDirError, match=want):
        ServiceHost(_settings(d, **extra))


# ---- never a pickle --------------------------------------------------------------------------------
def test_planted_pickles_are_never_loaded(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    old = Path("/tmp/gfservice")  # the old default directory, and its snapshot
    made_old = not old.exists()
    planted = not (old / "snapshot.pkl").exists()
    try:
        if planted:
            old.mkdir(exist_ok=True)
            (old / "snapshot.pkl").write_bytes(pickle.dumps(Boom(marker)))
        state = tmp_path / "state"
        state.mkdir(mode=0o700)
        (state / "snapshot.pkl").write_bytes(pickle.dumps(Boom(marker)))
        (state / "snapshot.json").write_bytes(pickle.dumps(Boom(marker)))  # at the snapshot path itself
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
        monkeypatch.chdir(tmp_path)
        core = ServiceHost(Settings(service={"state_dir": str(state), "metrics_port": None}))
        core.shutdown()
        assert not marker.exists(), "a pickle was loaded"
        assert core.restored == 0
        assert list(state.glob("snapshot.corrupt-*.json")), "the pickle at the snapshot path is set aside"
        assert not str(Settings().service.snapshot_path).startswith("/tmp/gfservice")
    finally:
        if made_old:
            shutil.rmtree(old, ignore_errors=True)
        elif planted:
            (old / "snapshot.pkl").unlink(missing_ok=True)


# ---- format and atomic writes -----------------------------------------------------------------------
def test_state_round_trips_exactly_with_arrays_tuples_and_ended_ranks():
    agg = Aggregator()
    core_msgs = [{"kind": "layout", "run": "r", "rank": k, "world_size": 2, "layers": ["a", "b"], "numel": [3, 4],
                  "sharded": [False, False]} for k in range(2)]
    for m in core_msgs:
        assert agg.submit(m).accepted
    for s in range(30):
        for k in range(2):
            agg.submit({"kind": "step", "run": "r", "rank": k, "step": s, "count": [3, 4],
                        "sum_sq": [1.0 + s, 2.0], "max_abs": [1.0, 1.0], "nonfinite": [0, 0]})
    assert agg.submit({"kind": "end", "run": "r", "rank": 1}).accepted
    state = agg.state_dict()
    assert state["runs"]["r"]["ended"] == [1]
    text = json.dumps(st.encode(state))
    assert '"__ndarray__"' in text, "detector state holds arrays; they are encoded explicitly"
    again = st.decode(json.loads(text))
    assert json.dumps(st.encode(again)) == text
    restored = Aggregator()
    restored.load_state_dict(again)
    assert restored._runs["r"].ended == {1}
    with pytest.raises(st.SnapshotError, match="objects"):
        st.decode({"__ndarray__": "|O", "shape": [1], "data": ""})
    assert st.decode(st.encode({(1, 2): np.float32(1.5)})) == {(1, 2): 1.5}


def test_writes_are_atomic_private_and_keep_the_previous_snapshot(tmp_path):
    d = tmp_path / "state"
    core = ServiceHost(_settings(d))
    _run(core, "r", range(3), nan_at=(1,))
    assert core.snapshot() and core.snapshot()
    core.shutdown()
    names = sorted(p.name for p in d.iterdir())
    assert names == ["snapshot.json", "snapshot.prev.json"], names  # no temporary file left behind
    assert stat.S_IMODE(os.stat(d / "snapshot.json").st_mode) == 0o600
    doc = json.loads((d / "snapshot.json").read_text())
    assert doc["version"] == st.VERSION and "r" in doc["state"]["runs"]


def test_a_symlink_at_the_snapshot_path_is_not_followed(tmp_path):
    d = tmp_path / "state"
    core = ServiceHost(_settings(d))
    _run(core, "r", range(3), nan_at=(1,))
    core.shutdown()
    os.rename(d / "snapshot.json", tmp_path / "elsewhere.json")
    (d / "snapshot.prev.json").unlink(missing_ok=True)
    (d / "snapshot.json").symlink_to(tmp_path / "elsewhere.json")
    core = ServiceHost(_settings(d))
    core.shutdown()
    assert core.restored == 0 and (tmp_path / "elsewhere.json").exists()


# ---- restore ---------------------------------------------------------------------------------------
def _two_snapshots(d: Path) -> list[tuple]:
    """A service that saved twice (the finding in both), then stopped; returns its findings."""
    core = ServiceHost(_settings(d))
    _run(core, "r", range(3), nan_at=(1,))
    assert core.snapshot()
    _run(core, "r", range(3, 5))
    core.shutdown()
    return _idents(core, "r")


@pytest.mark.parametrize("damage", ["truncate", "bad-json", "unknown-format", "bad-state"])
def test_a_damaged_snapshot_is_set_aside_and_the_previous_restored(tmp_path, damage, caplog):
    d = tmp_path / "state"
    before = _two_snapshots(d)
    latest = d / "snapshot.json"
    raw = latest.read_bytes()
    if damage == "truncate":
        latest.write_bytes(raw[: len(raw) // 2])
    elif damage == "bad-json":
        latest.write_text("{not json")
    elif damage == "unknown-format":
        latest.write_text('{"hello": 1}')
    else:  # valid JSON, a run that cannot be restored: nothing of it may leak into the service
        doc = json.loads(raw)
        doc["state"]["runs"]["broken"] = {"world_size": 1}
        latest.write_text(json.dumps(doc))
    damaged = latest.read_bytes()
    with caplog.at_level(logging.WARNING, "gfservice.service.core"):
        core = ServiceHost(_settings(d))
    core.shutdown()
    (aside,) = d.glob("snapshot.corrupt-*.json")
    assert aside.read_bytes() == damaged, "the damaged snapshot is kept as it was, never overwritten"
    assert core.restored == 1 and _idents(core, "r") == before
    assert "broken" not in {r["run"] for r in core.runs()}
    assert "restored 1 runs (r) with 1 findings" in caplog.text and "previous snapshot" in caplog.text


def test_both_damaged_starts_empty_and_keeps_both(tmp_path):
    d = tmp_path / "state"
    _two_snapshots(d)
    (d / "snapshot.json").write_text("{")
    (d / "snapshot.prev.json").write_text("")
    core = ServiceHost(_settings(d))
    core.shutdown()
    assert core.restored == 0 and len(list(d.glob("*.corrupt-*.json"))) == 2


def test_a_snapshot_from_a_newer_version_is_refused_and_left_alone(tmp_path):
    d = tmp_path / "state"
    _two_snapshots(d)
    doc = json.loads((d / "snapshot.json").read_text())
    doc["version"] = st.VERSION + 1
    (d / "snapshot.json").write_text(json.dumps(doc))
    with pytest.raises(st.SnapshotTooNew, match="newer gfservice"):
        ServiceHost(_settings(d))
    assert json.loads((d / "snapshot.json").read_text())["version"] == st.VERSION + 1


def test_findings_survive_stop_and_start(tmp_path):
    d = tmp_path / "state"
    before = _two_snapshots(d)
    core = ServiceHost(_settings(d))
    core.shutdown()
    assert before and _idents(core, "r") == before


def test_a_crash_between_write_and_rename_leaves_the_last_snapshot(tmp_path, monkeypatch):
    d = tmp_path / "state"
    core = ServiceHost(_settings(d))
    _run(core, "r", range(3), nan_at=(1,))
    assert core.snapshot()
    monkeypatch.setattr(st.os, "replace", lambda *a: (_ for _ in ()).throw(OSError(5, "power cut")))
    _run(core, "r2", range(3), nan_at=(0,))
    assert not core.snapshot()
    monkeypatch.undo()
    core._stop.set()  # a crash: no last snapshot
    core._snapshot_wanted.set()
    core2 = ServiceHost(_settings(d))
    core2.shutdown()
    assert core2.restored == 1 and _idents(core2, "r") == _idents(core, "r")


# ---- write failures never fail a submit ----------------------------------------------------------------
def test_an_unwritable_state_dir_mid_run_is_counted_exported_and_recovered(tmp_path, caplog):
    d = tmp_path / "state"
    core = ServiceHost(_settings(d, metrics_port=0))
    try:
        _run(core, "r", range(3), nan_at=(1,))
        _wait(lambda: core.snapshot_last_success is not None)
        os.rename(d, tmp_path / "away")
        d.write_text("not a directory any more")  # unwritable even for root
        with caplog.at_level(logging.ERROR, "gfservice.service.core"):
            for s in range(3, 9):  # each new finding asks for a snapshot; the ticker retries too
                _run(core, "r", range(s, s + 1), nan_at=(s,))
            _wait(lambda: core.snapshot_failures >= 3)
        assert len([r for r in caplog.records if "could not save" in r.message]) == 1, "logged once per burst"
        assert len(core.findings("r")) >= 2
        body = urllib.request.urlopen(f"http://127.0.0.1:{core.metrics_port}/metrics").read().decode()
        (line,) = [ln for ln in body.splitlines() if ln.startswith("gradflow_snapshot_failures_total ")]
        assert float(line.split()[1]) >= 3
        assert "gradflow_snapshot_last_success_timestamp_seconds " in body
        failures, t = core.snapshot_failures, time.time()
        d.unlink()
        os.rename(tmp_path / "away", d)
        _run(core, "r", range(9, 10), nan_at=(9,))
        _wait(lambda: (core.snapshot_last_success or 0) > t)
        assert core.snapshot_failures >= failures and core.status().snapshot.last_success > t
        saved = st.read_snapshot(d / "snapshot.json")["state"]["runs"]["r"]
        assert saved["last_step"] == 9
    finally:
        core.shutdown()


# ---- the real Ray actor --------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.slow
def test_ray_actor_killed_while_writing_then_stopped_and_started_keeps_its_findings(ray_cluster, tmp_path):
    import ray

    from gfservice.hosting import actor as svc

    settings = Settings.model_validate(_settings(tmp_path / "state", name="gf-durable", namespace="gf-durable"))
    lay = {"kind": "layout", "run": "k", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [2],
           "sharded": [False]}

    def step(s: int, bad: bool) -> dict:
        return {"kind": "step", "run": "k", "rank": 0, "step": s, "count": [2],
                "sum_sq": [float("nan") if bad else 1.0], "max_abs": [1.0], "nonfinite": [int(bad)]}

    handle, created = svc.start(settings)
    assert created
    try:
        ray.get(handle.submit.remote([lay, step(0, False), step(1, True), step(2, False)]))
        deadline = time.time() + 30
        while ray.get(handle.status.remote())["snapshot"]["last_success"] is None:
            assert time.time() < deadline
            time.sleep(0.05)
        before = [(f.detector, f.first_step) for f in ray.get(handle.findings.remote("k"))]
        pid = ray.get(handle.status.remote())["pid"]
        # a new finding asks the writer for a snapshot; the actor is killed while that write is under way
        handle.submit.remote([step(3, True), *[step(s, False) for s in range(4, 40)]])
        ray.kill(handle, no_restart=False)
        deadline = time.time() + 60
        while True:  # ray.kill is asynchronous: a call may still reach the old process; wait for the new one
            try:
                status = ray.get(handle.status.remote(), timeout=10)
                if status["pid"] != pid:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass
            assert time.time() < deadline, "Ray did not restart the service"
            time.sleep(0.2)
        assert status["restored_runs"] == 1
        after = [(f.detector, f.first_step) for f in ray.get(handle.findings.remote("k"))]
        assert set(before) <= set(after) and len(after) == len(set(after))
        assert svc.stop("gf-durable", "gf-durable")
        handle, created = svc.start(settings)
        assert created
        again = [(f.detector, f.first_step) for f in ray.get(handle.findings.remote("k"))]
        assert set(after) <= set(again), "findings survive stop and start"
        assert not list((tmp_path / "state").glob("*.tmp")), "no half-written file stays behind"
    finally:
        svc.stop("gf-durable", "gf-durable")


def test_the_discovery_file_names_advertise_addr_and_https_when_the_exporter_serves_tls(tmp_path):
    import subprocess

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=gf",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    tls = ServiceHost(_settings(tmp_path / "tls", metrics_port=0, advertise_addr="gf.example.internal",
                                exporter={"certfile": str(cert), "keyfile": str(key)}))
    plain = ServiceHost(_settings(tmp_path / "plain", metrics_port=0))
    try:
        from gfservice.observability.discovery import public_labels  # without the owner labels

        entry, = json.loads((tmp_path / "tls" / "prometheus-sd.json").read_text())
        entry["labels"] = public_labels(entry["labels"])
        assert entry == {"targets": [f"gf.example.internal:{tls.metrics_port}"],
                         "labels": {"service": "gfservice", "__scheme__": "https"}}
        entry, = json.loads((tmp_path / "plain" / "prometheus-sd.json").read_text())
        entry["labels"] = public_labels(entry["labels"])
        assert entry == {"targets": [f"127.0.0.1:{plain.metrics_port}"], "labels": {"service": "gfservice"}}
    finally:
        tls.shutdown()
        plain.shutdown()
