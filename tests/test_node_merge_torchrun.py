"""Node merging under torchrun: each node's local rank 0 merges its node over loopback and sends to global rank 0.

One machine, one ``torchrun --nproc-per-node 4`` job (gloo, CPU), split into two simulated nodes of two ranks by
``GFSERVICE_NODE_SIZE=2`` (ranks 0-1 and 2-3; both "nodes" are processes of this machine, so the loopback hop
and the hop to rank 0 are both local TCP: what is tested is the path and its rules, not a network).
``GFSERVICE_MERGE_AGENT=1`` turns merging on (a job this small would send directly). Each rank writes what it saw
to a JSON file the test reads.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_torchrun import _torchrun, _wait_for

NAN_STEP = 5
STEPS = 8
LAYERS = 6


def shard(rank: int, step: int) -> dict[str, list[float]]:
    """Rank ``rank``'s shard statistics of step ``step`` (float64, reproducible on every rank)."""
    from gfservice.stats import GradStats

    g = np.random.default_rng(1000 * step + rank).normal(size=(LAYERS, 32)) * (1 + rank) * 1e3
    s = GradStats.from_arrays({f"l{i}": g[i] for i in range(LAYERS)})
    return {"count": s.count.tolist(), "sum_sq": s.sum_sq.tolist(), "max_abs": s.max_abs.tolist(),
            "nonfinite": s.nonfinite.tolist()}


def sharded_messages(rank: int, world: int, attempt: str):
    from gfservice.wire import Layout, StepReport

    layout = Layout(run="nm-exact", rank=rank, world_size=world, layers=[f"l{i}" for i in range(LAYERS)],
                    numel=[32 * world] * LAYERS, sharded=[True] * LAYERS, attempt=attempt)
    reports = [StepReport(run="nm-exact", rank=rank, step=step, attempt=attempt, stats=shard(rank, step),
                          local_norm=float(rank + step), step_time=0.01 * (rank + 1)) for step in range(STEPS)]
    return layout, reports


def _forgeries(rank: int, store) -> dict:
    """Rank 1, which holds the job's secret, tries to speak for ranks it did not authenticate as."""
    from gfservice.service.auth import peer_key
    from gfservice.service.peer_protocol import HandshakeError, encode_frame, handshake, read_frame
    from gfservice.training.peer_sender import SECRET_KEY, STORE_KEY

    address = bytes(store.get(STORE_KEY.format(run="nm-exact", attempt="exact"))).decode()
    secret = bytes(store.get(SECRET_KEY.format(run="nm-exact", attempt="exact"))).decode()
    host, _, port = address.rpartition(":")
    key = peer_key(secret, os.environ.get("GFSERVICE_TOKEN"))
    out: dict = {}
    node_report = {"kind": "step", "run": "nm-exact", "rank": 2, "step": 3, "attempt": "exact",
                   "stats": shard(2, 3), "node": {"ranks": [2, 3], "nonfinite": [3]}}
    widened = {**node_report, "rank": 1, "node": {"ranks": [1, 2], "nonfinite": [2]}}
    with socket.create_connection((host, int(port))) as sock:  # authenticated as plain rank 1
        handshake(sock, key, "nm-exact", 1, "exact")
        sock.sendall(encode_frame({"run": "nm-exact", "messages": [node_report, widened], "dropped": 0}))
        out["forged_node_report"] = read_frame(sock)["rejected"]
    for name, claim_rank, node in (("past_world", 3, 2), ("over_node_size", 0, 4)):
        with socket.create_connection((host, int(port))) as sock:
            try:
                handshake(sock, key, "nm-exact", claim_rank, "exact", node=node)
                out[name] = "accepted"
            except HandshakeError as exc:
                out[name] = f"refused: {exc}"
    return out


def worker(out_dir: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    import gfservice
    from gfservice.config import load_settings
    from gfservice.training import peer_sender

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {"rank": rank}

    # 1. Sharded statistics, sent through the job's transport (each rank its own shard), to check exactness.
    # (rank 0's host starts here, and its aggregator keeps these detector settings for the job's later runs)
    settings = load_settings(data={"detectors": {"nonfinite": {"stop_run": True}}})
    transport = peer_sender.connect_peers("nm-exact", "exact", settings)
    assert transport is not None
    layout, reports = sharded_messages(rank, world, "exact")
    transport.send(layout)
    for report in reports:
        transport.send(report)
    out["exact_flushed"] = transport.flush()

    # 2. DDP; rank 3's batch holds a NaN at NAN_STEP.
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gfservice.monitor(model, opt, run="nm-nan", deep_every=0, detectors={"nonfinite": {"stop_run": True}})
    out["transport"] = type(mon.transport).__name__
    for step in range(STEPS + 4):
        x, y = torch.randn(16, 8), torch.randn(16, 1)
        if rank == 3 and step == NAN_STEP:
            x[0, 0] = float("nan")
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        mon.step(loss=loss)
        opt.zero_grad()
    _wait_for(lambda: mon.should_stop and any(f.detector == "nonfinite" for f in mon.findings))
    out["findings"] = [f.model_dump(mode="json") for f in mon.findings]
    out["stop_reason"] = mon.stop_reason
    mon.close()

    if rank == 1:
        out["forgeries"] = _forgeries(rank, c10d._get_default_store())
    dist.barrier()
    if rank == 0:
        host = peer_sender.peer_host()
        assert host is not None
        agg = host.aggregator
        _wait_for(lambda: len(agg.history("nm-exact")) >= STEPS)
        out["exact"] = [{"step": s.step, "sum_sq": s.grads.sum_sq.tolist(), "count": s.grads.count.tolist(),
                         "max_abs": s.grads.max_abs.tolist(), "ranks": s.rank_ids.tolist(),
                         "rank_norm": s.rank_norm.tolist(), "missing": list(s.missing_ranks)}
                        for s in agg.history("nm-exact")]
        out["server"] = {"refused": host.server.refused, "connections": host.server.connections}
    node = peer_sender._NODE
    out["merged_steps"] = node.merger.merged_steps if node is not None else None
    dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out, allow_nan=True))
    import atexit  # gloo's destructor can deadlock with DDP's comm hook: leave after the exit handlers

    atexit._run_exitfuncs()
    os._exit(0)


@pytest.mark.slow
def test_node_merge_under_torchrun_is_exact_names_the_rank_and_refuses_forgeries(tmp_path):
    from gfservice.service.aggregator import Aggregator

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GFSERVICE_"))}
    env.update(OMP_NUM_THREADS="1", XDG_STATE_HOME=str(tmp_path / "state"), GFSERVICE_TOKEN="t0ken",
               GFSERVICE_MERGE_AGENT="1", GFSERVICE_NODE_SIZE="2", GFSERVICE_SERVICE__SD_FILE="",
               GFSERVICE_AGGREGATOR__MERGE_TIMEOUT_S="2.0", GFSERVICE_SERVICE__TICK_INTERVAL_S="0.1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    t0 = time.monotonic()
    proc = subprocess.run([_torchrun(), "--standalone", "--nproc-per-node", "4", __file__, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(4)]
    print(f"node-merged torchrun job (2 simulated nodes x 2 ranks): {wall:.1f} s wall; merged steps on the "
          f"nodes' local rank 0: {r[0]['merged_steps']} and {r[2]['merged_steps']}")

    # Merging happened on each node's local rank 0, and only there.
    assert r[0]["merged_steps"] >= STEPS and r[2]["merged_steps"] >= STEPS
    assert r[1]["merged_steps"] is None and r[3]["merged_steps"] is None
    # The NaN on rank 3 (merged into node 2-3's report) is named in rank 0's finding, and every rank hears of it.
    for ri in r:
        assert ri["transport"] == "PeerSender"
        nan = [f for f in ri["findings"] if f["detector"] == "nonfinite"]
        assert nan and nan[0]["ranks"] == [3] and nan[0]["first_step"] == NAN_STEP, ri["findings"]
        assert (ri["stop_reason"] or "").startswith("nonfinite:"), ri  # the verdict reaches every rank too
    # Exact: the same statistics as the direct path (every rank's report straight into an aggregator).
    direct = Aggregator()
    sent = [sharded_messages(rank, 4, "exact") for rank in range(4)]
    for layout, _ in sent:
        direct.submit(layout)
    for step in range(STEPS):
        for _, reports in sent:
            direct.submit(reports[step])
    want = direct.history("nm-exact")
    got = r[0]["exact"]
    assert [g["step"] for g in got] == list(range(STEPS)) == [w.step for w in want]
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        assert g["ranks"] == [0, 1, 2, 3] and g["missing"] == []
        np.testing.assert_array_equal(g["count"], w.grads.count)
        np.testing.assert_array_equal(g["max_abs"], w.grads.max_abs)
        np.testing.assert_array_equal(g["rank_norm"], w.rank_norm)
        worst = max(worst, float(np.max(np.abs(np.asarray(g["sum_sq"]) - w.grads.sum_sq) / w.grads.sum_sq)))
    print(f"largest relative error of the merged sum_sq against the direct path: {worst:.1e}")
    assert worst <= 1e-9, worst
    # Rank 1 holds the job's secret, yet may speak for no rank but its own, nor claim a node it cannot have.
    forged = r[1]["forgeries"]
    assert forged["forged_node_report"] == [[0, "unauthorized"], [1, "unauthorized"]], forged
    assert forged["past_world"].startswith("refused") and forged["over_node_size"].startswith("refused"), forged
    assert r[0]["server"]["refused"] >= 2


def test_a_node_host_merges_its_ranks_into_rank_0s_server_in_process():
    """The same path without torchrun: two ranks of a node send to their NodeHost, which forwards one merged
    report per step through a node-authenticated sender; rank 0's server refuses a node wider than admitted."""
    from gfservice.hosting.node_merger import NodeHost
    from gfservice.service.aggregator import Aggregator
    from gfservice.service.peer_protocol import HandshakeError, handshake
    from gfservice.service.peer_server import PeerServer
    from gfservice.training.peer_sender import PeerSender

    server = PeerServer(Aggregator(), hello_timeout_s=2.0)
    key = server.admit("nm-exact", "a", 4, "job", node_size=2)
    node = NodeHost(wait_s=5.0, tick_interval_s=0.05)
    upstream = PeerSender("nm-exact", 2, "a", lambda: (server.address, "job"), node=2, on_answer=node.note_answer)
    node.serve("nm-exact", "a", 4, "node", range(2, 4), upstream)
    ranks = [PeerSender("nm-exact", r, "a", lambda: (node.address, "node")) for r in (2, 3)]
    for r, sender in zip((2, 3), ranks, strict=True):
        layout, reports = sharded_messages(r, 4, "a")
        sender.send(layout)
        for report in reports[:3]:
            sender.send(report)
    for sender in ranks:
        sender.close()
    assert _wait_for(lambda: node.merger.merged_steps >= 3)
    with socket.create_connection(node.server.sockaddr) as sock, pytest.raises(HandshakeError):  # not its node
        handshake(sock, node.server.admit("nm-exact", "a", 4, "node", ranks=range(2, 4)), "nm-exact", 1, "a")
    node.close()  # delivers what is queued
    server.aggregator.flush("nm-exact")  # ranks 0 and 1 never report: merge what came
    first = server.aggregator.history("nm-exact")[0]
    assert first.rank_ids.tolist() == [2, 3] and first.missing_ranks == (0, 1)
    want = np.sum([shard(r, 0)["sum_sq"] for r in (2, 3)], axis=0)
    np.testing.assert_allclose(first.grads.sum_sq, want, rtol=1e-12)
    with socket.create_connection(server.sockaddr) as sock, pytest.raises(HandshakeError, match="node size"):
        handshake(sock, key, "nm-exact", 0, "a", node=3)
    server.close()

if __name__ == "__main__":  # under torchrun
    worker(sys.argv[1])
