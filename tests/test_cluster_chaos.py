"""Chaos on real Ray: the node that holds the service dies and the service comes back on another node from its
snapshot on shared storage; one rank of a live run blocks and ``stalled_rank`` names it, then clears.

The multi-node scenario runs in a subprocess with its own ``ray.cluster_utils.Cluster`` (the session already
called ``ray.init()`` in this process); the stalled rank uses the session's service.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from gfservice.service.client import Client

pytestmark = [pytest.mark.ray, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: a head (1 CPU) and two workers (1 CPU each, one with the "svc" resource). The
# service actor is created as ``actor.start`` creates it, except that it needs a little of "svc" instead of the
# head-node affinity, so that it lives on the worker that has it. Its state directory is on storage every node
# sees. That node is removed, a new node with "svc" is added; the service must come back there, restored.
CLUSTER_SCRIPT = """
import json, sys, time

import ray
import ray._private.state as ray_state
from ray.cluster_utils import Cluster

from gfservice.config import Settings
from gfservice.hosting.actor import ServiceActor, find

shared = sys.argv[1]
out = {}
settings = Settings(
    aggregator={"merge_timeout_s": 2.0},
    service={"name": "gf-chaos", "namespace": "gf-chaos", "state_dir": shared, "metrics_port": None,
             "snapshot_interval_s": 0.3, "tick_interval_s": 0.1},
)


def node_of(handle):
    info = ray_state.actors(handle._actor_id.hex())
    return (info.get("Address") or {}).get("NodeID"), info.get("State")


def lay(run):
    return {"kind": "layout", "run": run, "rank": 0, "world_size": 1, "layers": ["w", "b"], "numel": [4, 2],
            "sharded": [False, False]}


def step(run, s, bad=False):
    return {"kind": "step", "run": run, "rank": 0, "step": s, "count": [4, 2],
            "sum_sq": [float("nan") if bad else 1.0, 0.5], "max_abs": [1.0, 0.5], "nonfinite": [int(bad), 0]}


def until(what, fn, timeout):
    deadline = time.time() + timeout
    while True:
        try:
            got = fn()
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, ray.exceptions.ActorUnavailableError):
            got = None
        if got:
            return got
        if time.time() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


t0 = time.time()
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
svc_node = cluster.add_node(num_cpus=1, resources={"svc": 1})
cluster.wait_for_nodes()
ray.init(address=cluster.address, namespace="gf-chaos", log_to_driver=False, logging_level="ERROR")
out["cluster_up_s"] = round(time.time() - t0, 1)
try:
    handle = ray.remote(ServiceActor).options(
        name="gf-chaos", namespace="gf-chaos", lifetime="detached", max_restarts=-1, max_task_retries=0,
        max_concurrency=8, num_cpus=0, resources={"svc": 0.01},
    ).remote(settings.model_dump())
    ray.get(handle.ping.remote(), timeout=60)
    out["svc_node"] = svc_node.node_id
    out["node_before"] = node_of(handle)[0]
    pid_before = ray.get(handle.status.remote())["pid"]
    answer = ray.get(handle.submit.remote([lay("c"), *(step("c", s, bad=(s == 2)) for s in range(5))]), timeout=30)
    out["rejected_before"] = answer["rejected"]
    until("a snapshot", lambda: ray.get(handle.status.remote(), timeout=10)["snapshot"]["last_success"], 30)
    out["findings_before"] = sorted({(f.detector, f.first_step) for f in ray.get(handle.findings.remote("c"))})

    t1 = time.time()
    cluster.remove_node(svc_node)
    new_node = cluster.add_node(num_cpus=1, resources={"svc": 1})
    handle = until("the service to answer again", lambda: find("gf-chaos", "gf-chaos"), 60)
    until("the service to answer again", lambda: ray.get(handle.ping.remote(), timeout=10) == "pong", 90)
    out["recovery_s"] = round(time.time() - t1, 1)
    out["new_node"] = new_node.node_id
    out["node_after"] = node_of(handle)[0]
    status = ray.get(handle.status.remote(), timeout=30)
    out["pid_changed"] = status["pid"] != pid_before
    out["restored_runs"] = status["restored_runs"]
    out["findings_after"] = sorted({(f.detector, f.first_step) for f in ray.get(handle.findings.remote("c"))})
    answer = ray.get(handle.submit.remote([step("c", s) for s in range(5, 8)]), timeout=30)
    out["rejected_after"] = answer["rejected"]
    out["latest_after"] = ray.get(handle.latest.remote("c"), timeout=30).step
    ray.get(handle.shutdown.remote(), timeout=30)
    ray.kill(handle, no_restart=True)
finally:
    ray.shutdown()
    cluster.shutdown()
out["total_s"] = round(time.time() - t0, 1)
print("RESULT " + json.dumps(out))
"""


def test_service_moves_to_a_new_node_and_restores_from_shared_storage(tmp_path):
    script = tmp_path / "cluster_chaos.py"
    script.write_text(textwrap.dedent(CLUSTER_SCRIPT))
    shared = tmp_path / "shared"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # its own process group: on a timeout the cluster's processes (GCS, raylets, workers) go with the script
    proc = subprocess.Popen([sys.executable, str(script), str(shared)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the cluster scenario took over 150 s\n{stdout[-3000:]}\n{stderr[-5000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{stdout[-3000:]}\n{stderr[-5000:]}"
    out = json.loads(lines[-1][len("RESULT "):])
    print(f"\ncluster chaos: {out}")
    assert out["rejected_before"] == [] and out["rejected_after"] == []
    assert out["node_before"] == out["svc_node"], "the service started on the node with the svc resource"
    assert out["node_after"] == out["new_node"], "the service came back on the new node"
    assert out["pid_changed"]
    assert out["restored_runs"] == 1, "restored from the snapshot on shared storage"
    assert ["nonfinite", 2] in out["findings_before"]
    assert out["findings_after"] == out["findings_before"], "findings neither lost nor repeated"
    assert out["latest_after"] == 7, "reports resume after the move"
    assert (shared / "snapshot.json").exists()


def _layout(run: str, rank: int) -> dict:
    # As DDP does: rank 0 reports the layers, the other ranks send heartbeats only.
    lead = rank == 0
    return {"kind": "layout", "run": run, "rank": rank, "world_size": 2, "layers": ["w", "b"] if lead else [],
            "numel": [4, 2] if lead else [], "sharded": [False, False] if lead else [], "reports_layers": lead}


def _step(run: str, rank: int, s: int) -> dict:
    msg: dict = {"kind": "step", "run": run, "rank": rank, "step": s, "time": time.time()}
    if rank == 0:
        msg.update(count=[4, 2], sum_sq=[1.0, 0.5], max_abs=[1.0, 0.5], nonfinite=[0, 0])
    return msg


def _stalled(service: Client, run: str) -> list:
    return [f for f in service.findings(run) if f.detector == "stalled_rank"]


def test_a_blocked_rank_is_named_by_stalled_rank_and_clears_when_it_reports_again(service: Client):
    run = f"t-stall-{os.getpid()}"
    assert service.submit([_layout(run, 0), _layout(run, 1)])["rejected"] == []
    step = 0
    for step in range(3):  # both ranks report
        assert service.submit([_step(run, 0, step), _step(run, 1, step)])["rejected"] == []
    assert service.latest(run).step == 2 and service.latest(run).missing_ranks == ()
    t0 = time.time()
    found = []
    while not found:  # rank 1 is blocked; rank 0 goes on past the merge timeout (2 s)
        assert time.time() - t0 < 20, f"no stalled_rank finding; runs: {service.runs()}"
        step += 1
        assert service.submit([_step(run, 0, step)])["rejected"] == []
        time.sleep(0.3)
        found = [f for f in _stalled(service, run) if f.active]
    stalled_after = time.time() - t0
    (finding,) = found
    assert finding.ranks == [1] and finding.severity.value == "critical"
    assert "rank 1" in finding.message
    # rank 1 is back: it reports the current step, the overtaken ones merge at once and the next merge is whole
    t1 = time.time()
    for s in (step + 1, step + 2):
        assert service.submit([_step(run, 0, s), _step(run, 1, s)])["rejected"] == []
    deadline = time.time() + 10
    while any(f.active for f in _stalled(service, run)):
        assert time.time() < deadline, f"stalled_rank did not clear: {_stalled(service, run)}"
        time.sleep(0.1)
    print(f"\nstalled_rank raised {stalled_after:.1f} s after rank 1 blocked, cleared {time.time() - t1:.1f} s "
          "after it reported again")
    assert service.latest(run).step == step + 2 and service.latest(run).missing_ranks == ()
    (cleared,) = _stalled(service, run)
    assert not cleared.active and cleared.cleared_time is not None
