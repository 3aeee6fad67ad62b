"""A fleet sharded by run (issue 24, part 3): the hash that places runs, each shard's own settings, and the real
shard actors on the shared Ray cluster: runs land where the hash says, the client sees one service, a killed shard
comes back with its runs from its own snapshot, and one shard is the service as it always was."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gfservice.config import Settings
from gfservice.service.sharding import fleet_of, group_by_shard, shard_for, shard_index, shard_names, shard_settings

names_of_runs = st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=50, unique=True)


# ---- the hash ---------------------------------------------------------------------------------------------
@given(runs=names_of_runs, n=st.integers(1, 16))
@settings(max_examples=50, deadline=None)
def test_the_shard_of_a_run_is_stable_and_one_of_the_fleet(runs, n):
    fleet = shard_names("gf", n)
    placed = [shard_for(r, fleet) for r in runs]
    assert placed == [shard_for(r, list(fleet)) for r in runs]  # same answer every time, in every process
    assert set(placed) <= set(fleet)
    assert placed == [shard_for(r, list(reversed(fleet))) for r in runs], "the shard list's order does not matter"


@given(n=st.integers(2, 12), seed=st.integers(0, 10_000))
@settings(max_examples=20, deadline=None)
def test_runs_spread_evenly_and_a_new_shard_takes_about_one_in_n_plus_one(n, seed):
    runs = [f"run-{seed}-{i}" for i in range(4000)]
    before = {r: shard_for(r, shard_names("gf", n)) for r in runs}
    load = Counter(before.values())
    mean = len(runs) / n
    assert set(load) == set(shard_names("gf", n))
    assert max(abs(c - mean) for c in load.values()) < 0.2 * mean + 40, load  # binomial noise: a few sigma
    grown = shard_names("gf", n + 1)
    after = {r: shard_for(r, grown) for r in runs}
    moved = [r for r in runs if after[r] != before[r]]
    assert all(after[r] == grown[-1] for r in moved), "a run moves only to the new shard"
    assert len(moved) < len(runs) / (n + 1) * 1.2 + 40


def test_shard_names_and_their_settings():
    assert shard_names("gf", 1) == ["gf"] and fleet_of("gf", 1) == ["gf"]
    assert fleet_of("gf-shard-3", 4) == shard_names("gf", 4) == ["gf", "gf-shard-1", "gf-shard-2", "gf-shard-3"]
    assert [shard_index("gf", n) for n in shard_names("gf", 4)] == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        shard_names("gf", 0)
    assert group_by_shard([{"run": "a"}, {"kind": "layout"}], ["gf"]) == {"gf": [0, 1]}
    base = Settings.model_validate({"service": {"state_dir": "/s", "shards": 3, "metrics_port": 0,
                                                "snapshot_path": "/snap/x.json"}})
    fleet = [shard_settings(base, i).service for i in range(3)]
    assert fleet[0] == base.service
    assert [c.name for c in fleet] == shard_names("gfservice", 3)
    assert [c.snapshot_path for c in fleet] == ["/snap/x.json", "/snap/x-shard-1.json", "/snap/x-shard-2.json"]
    assert [c.state_dir for c in fleet] == ["/s", "/s/shard-1", "/s/shard-2"]
    # every discovery file beside shard 0's, so the Prometheus glob prometheus-sd*.json finds each one
    assert [Path(c.sd_file).name for c in fleet] == ["prometheus-sd.json", "prometheus-sd-shard-1.json",
                                                     "prometheus-sd-shard-2.json"]
    assert {c.metrics_port for c in fleet} == {0}  # any free port each
    with pytest.raises(ValueError):
        shard_settings(base, 3)


# ---- real shard actors --------------------------------------------------------------------------------------
def _layout(run: str) -> dict:
    return {"kind": "layout", "run": run, "rank": 0, "world_size": 1, "layers": ["w", "b"], "numel": [4, 1],
            "sharded": [False, False]}


def _step(run: str, s: int, bad: bool = False) -> dict:
    return {"kind": "step", "run": run, "rank": 0, "step": s, "count": [4, 1],
            "sum_sq": [float("nan") if bad else 1.0, 0.5], "max_abs": [1.0, 0.5], "nonfinite": [int(bad), 0]}


def _wait(what, timeout_s: float = 60.0):
    deadline = time.time() + timeout_s
    while True:
        try:
            got = what()
            if got:
                return got
        except Exception:  # a shard restarting
            if time.time() > deadline:
                raise
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.slow
def test_a_fleet_of_three_routes_runs_sees_them_all_and_restores_a_killed_shard(ray_cluster, tmp_path, capsys):
    from gfservice.cli.main import main
    from gfservice.hosting import actor as svc
    from gfservice.service.client import connect, find, find_for_run
    from gfservice.service.state import read_snapshot

    ray = ray_cluster
    state = tmp_path / "state"
    cfg = Settings.model_validate({"service": {
        "name": "gf-fleet", "namespace": "gf-fleet", "state_dir": str(state), "shards": 3, "metrics_port": 0,
        "snapshot_interval_s": 0.2, "tick_interval_s": 0.05}})
    fleet = shard_names("gf-fleet", 3)
    runs = [f"job-{i}" for i in range(12)]
    try:
        _, created = svc.start(cfg)
        assert created
        client = connect(name="gf-fleet", namespace="gf-fleet")
        assert list(client.shards) == fleet
        answer = client.submit([m for r in runs for m in (_layout(r), _step(r, 0), _step(r, 1, bad=r == "job-3"))])
        assert answer["rejected"] == []
        # a refusal names the message by its index in the whole batch, whichever shard refused it
        late = client.submit([_layout("late"), _step("never-laid-out", 0), _step("late", 0)])
        assert late["rejected"] == [[1, "unknown_run"]]
        runs.append("late")
        # each run is on the shard the hash names, and only there
        for name in fleet:
            held = {row["run"] for row in ray.get(find(name, "gf-fleet").runs.remote())}
            assert held == {r for r in runs if shard_for(r, fleet) == name}, name
        assert all(find_for_run("gf-fleet", "gf-fleet", r) is not None for r in runs[:2])
        # the client sees one service: every run, every finding, status merged
        assert sorted(row["run"] for row in client.runs()) == sorted(runs)
        assert _wait(lambda: client.findings("job-3"))[0].detector
        status = client.status()
        assert len(status["runs"]) == 13 and status["counters"]["accepted"] == 38
        assert [s["name"] for s in status["shards"]] == fleet and len(set(s["pid"] for s in status["shards"])) == 3
        # the command line sees one service too
        assert main(["status", "--name", "gf-fleet", "--namespace", "gf-fleet"]) == 0
        printed = capsys.readouterr().out
        assert all(r in printed for r in runs) and all(f"shard {n}:" in printed for n in fleet)
        # each shard has its own /metrics and its own discovery entry
        sd = sorted(state.glob("prometheus-sd*.json"))
        targets = {json.loads(p.read_text())[0]["targets"][0] for p in sd}
        assert len(sd) == 3 and len(targets) == 3
        assert targets == {s["metrics"] for s in status["shards"]}
        # kill the shard of job-3: Ray restarts it and it restores its runs from its own snapshot
        victim = shard_for("job-3", fleet)
        mine = {r for r in runs if shard_for(r, fleet) == victim}
        handle = find(victim, "gf-fleet")
        pid = ray.get(handle.status.remote())["pid"]
        snapshot = shard_settings(cfg, fleet.index(victim)).service.snapshot_path  # the shard's own snapshot
        _wait(lambda: set(read_snapshot(snapshot)["state"]["runs"]) == mine)  # holds every run of the shard
        ray.kill(handle, no_restart=False)
        back = _wait(lambda: (s := ray.get(handle.status.remote(), timeout=10))["pid"] != pid and s)
        assert back["restored_runs"] == len(mine)
        assert {row["run"] for row in ray.get(handle.runs.remote())} == mine
        assert sorted(row["run"] for row in client.runs()) == sorted(runs), "no run lost"
        assert [f.detector for f in client.findings("job-3")], "its findings came back with it"
    finally:
        svc.stop("gf-fleet", "gf-fleet")
    assert all(find(n, "gf-fleet") is None for n in fleet), "stop ends every shard"


@pytest.mark.ray
def test_one_shard_is_the_service_as_before(ray_cluster, tmp_path):
    from gfservice.hosting import actor as svc
    from gfservice.service.client import connect, find

    cfg = Settings.model_validate({"service": {"name": "gf-one", "namespace": "gf-one",
                                               "state_dir": str(tmp_path), "metrics_port": 0}})
    assert cfg.service.shards == 1
    try:
        handle, created = svc.start(cfg)
        client = connect(name="gf-one", namespace="gf-one")
        assert created and list(client.shards) == [""] and client.handle == handle
        client.submit([_layout("r"), _step("r", 0)])
        status = client.status()
        assert "shards" not in status and [r["run"] for r in status["runs"]] == ["r"]
        assert "shard" not in status["runs"][0]
        assert [p.name for p in tmp_path.glob("prometheus-sd*.json")] == ["prometheus-sd.json"]
        named = {a["name"] for a in ray_cluster.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "gf-one"}
        assert named == {"gf-one"}
    finally:
        svc.stop("gf-one", "gf-one")
    assert find("gf-one", "gf-one") is None
