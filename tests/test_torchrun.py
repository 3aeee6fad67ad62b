"""torchrun without Ray: rank 0 aggregates the job, the other ranks send to it on their own TCP channel.

The end-to-end test launches this very file under ``torchrun --nproc-per-node 2`` (gloo, CPU): each rank writes
what it saw to a JSON file the test reads. The other tests drive the peer server and sender in this process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

NAN_STEP = 6
STALL_AT = 5
STALL_S = 3.0


# ---- the training script, run on every rank by torchrun ---------------------------------------------
def _wait_for(predicate, timeout_s: float = 8.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _findings(mon) -> list[dict]:
    return [f.model_dump(mode="json") for f in mon.findings]


def worker(out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    import gfservice
    from gfservice.training.peer_sender import peer_host

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out: dict = {"rank": rank}

    # 1. DDP; rank 1's batch holds a NaN at NAN_STEP. The monitor stops the run on it (stop_run); its guard skips
    #    that step's update on both ranks (the all-reduced gradients are NaN on both).
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon = gfservice.monitor(model, opt, run="tr-nan", deep_every=0, detectors={"nonfinite": {"stop_run": True}},
                            guard=True)
    out["transport"], out["world"] = type(mon.transport).__name__, mon.world_size
    stop_seen = None
    for step in range(30):
        x, y = torch.randn(16, 8), torch.randn(16, 1)
        if rank == 1 and step == NAN_STEP:
            x[0, 0] = float("nan")
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        mon.step(loss=loss)
        opt.zero_grad()
        if mon.should_stop and stop_seen is None:  # every rank learns it (this test trains on regardless)
            stop_seen = step
        time.sleep(0.02)
    _wait_for(lambda: mon.should_stop and any(f["detector"] == "nonfinite" for f in _findings(mon)))
    out["nan"] = {"stop_seen": stop_seen, "stop_reason": mon.stop_reason, "findings": _findings(mon),
                  "dropped": mon.transport.dropped, "step_ms": mon.overhead_s / mon.steps * 1000,
                  "skipped": mon.skipped_steps, "params": [p.detach().double().flatten().tolist()
                                                           for p in model.parameters()]}
    mon.close()

    # 2. No DDP: rank 1 stalls for STALL_S seconds while rank 0 trains on.
    local = torch.nn.Linear(8, 1)
    opt = torch.optim.SGD(local.parameters(), lr=0.01)
    mon = gfservice.monitor(local, opt, run="tr-stall", deep_every=0)
    for step in range(60):
        if rank == 1 and step == STALL_AT:
            time.sleep(STALL_S)
        local(torch.randn(4, 8)).pow(2).mean().backward()
        opt.step()
        mon.step()
        opt.zero_grad()
        time.sleep(0.05 if rank == 0 else 0.0)
    _wait_for(lambda: any(f["detector"] == "stalled_rank" for f in _findings(mon)))
    out["stall"] = {"findings": _findings(mon)}
    mon.close()

    dist.barrier()  # every rank's last reports are in: rank 0 reads its own /metrics
    if rank == 0:
        import urllib.request

        host = peer_host()
        assert host is not None
        t0 = time.perf_counter()
        text = urllib.request.urlopen(host.metrics_url, timeout=10).read().decode()
        out["scrape_s"] = time.perf_counter() - t0
        out["metrics_url"] = host.metrics_url
        out["metrics"] = [ln for ln in text.splitlines() if 'run="tr-' in ln]
        out["sd"] = json.loads(host.sd_file.read_text()) if host.sd_file else None
        out["refused"], out["bad_frames"] = host.server.refused, host.server.bad_frames
    dist.barrier()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out, allow_nan=True))
    # Leave without destroy_process_group(): with DDP's Python comm hook (the monitor's LocalNormHook) gloo's
    # destructor can deadlock (see benchmarks/zoo_ranks.py). The exit handlers run first: rank 0 withdraws its
    # discovery entry there.
    import atexit

    atexit._run_exitfuncs()
    os._exit(0)


# ---- the tests -----------------------------------------------------------------------------------
def _torchrun() -> str:
    return str(Path(sys.executable).with_name("torchrun"))


@pytest.mark.slow
def test_torchrun_two_ranks_merge_on_rank_0(tmp_path):
    """Under torchrun without Ray: rank 1's NaN is a critical finding naming rank 1 on every rank, the guard skips
    that step on both ranks (which end with equal, finite parameters), rank 0's /metrics shows the run, and a
    stalled rank 1 is found."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "GFSERVICE_"))}
    env.update(OMP_NUM_THREADS="1", XDG_STATE_HOME=str(tmp_path / "state"), GFSERVICE_TOKEN="t0ken",
               GFSERVICE_AGGREGATOR__MERGE_TIMEOUT_S="1.0", GFSERVICE_SERVICE__TICK_INTERVAL_S="0.1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    t0 = time.monotonic()
    proc = subprocess.run([_torchrun(), "--standalone", "--nproc-per-node", "2", __file__, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=180)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    print(f"torchrun job: {wall:.1f} s wall; NaN at step {NAN_STEP}, should_stop seen at step "
          f"{r0['nan']['stop_seen']} (rank 0) and {r1['nan']['stop_seen']} (rank 1); /metrics scrape "
          f"{r0['scrape_s'] * 1000:.1f} ms; monitor.step {r0['nan']['step_ms']:.2f} ms (rank 0), "
          f"{r1['nan']['step_ms']:.2f} ms (rank 1)")
    assert "metrics at http://127.0.0.1:" in proc.stderr  # rank 0 says once where to scrape
    assert proc.stderr.count("rank 0 aggregates this job") == 1
    for r in (r0, r1):
        assert r["transport"] == "PeerSender" and r["world"] == 2
        nan = [f for f in r["nan"]["findings"] if f["detector"] == "nonfinite"]
        assert nan, r["nan"]
        assert nan[0]["severity"] == "critical" and nan[0]["first_step"] == NAN_STEP and nan[0]["ranks"] == [1]
        assert r["nan"]["stop_reason"].startswith("nonfinite:")
        assert not [f for f in r["nan"]["findings"] if f["detector"] == "stalled_rank"]  # no false alarm
        assert r["nan"]["dropped"] == 0
        assert r["nan"]["skipped"] == [[NAN_STEP, "nonfinite_gradient"]], r["nan"]["skipped"]
        stalled = [f for f in r["stall"]["findings"] if f["detector"] == "stalled_rank"]
        assert stalled and stalled[0]["ranks"] == [1] and stalled[0]["severity"] == "critical", r["stall"]
        assert STALL_AT <= stalled[0]["first_step"] < 40
    assert r0["nan"]["params"] == r1["nan"]["params"], "both ranks skipped the same step: replicas equal"
    assert all(math.isfinite(v) for p in r0["nan"]["params"] for v in p)
    metrics = "\n".join(r0["metrics"])
    assert 'gradflow_last_step{run="tr-nan"} 29.0' in metrics, metrics
    assert 'gradflow_findings_total{detector="nonfinite",run="tr-nan",severity="critical"}' in metrics, metrics
    assert 'gradflow_steps_skipped_total{reason="nonfinite_gradient",run="tr-nan"} 1.0' in metrics, metrics
    assert any(ln.startswith("gradflow_finding{") and 'ranks="1"' in ln and "nonfinite" in ln
               for ln in r0["metrics"]), metrics
    assert r0["sd"][0]["targets"] == [r0["metrics_url"].split("/")[2]]
    assert r0["refused"] == 0 and r0["bad_frames"] == 0, proc.stderr[-4000:]
    assert not list((tmp_path / "state" / "gfservice").glob("prometheus-sd-*.json"))  # withdrawn at exit


def test_a_single_process_keeps_its_in_process_aggregator():
    import torch

    import gfservice
    from gfservice.training.transport import InProcessTransport

    torch.set_num_threads(1)
    assert not torch.distributed.is_initialized()
    model = torch.nn.Linear(4, 1)
    mon = gfservice.monitor(model, torch.optim.SGD(model.parameters(), lr=0.1), run="single", service=None)
    assert isinstance(mon.transport, InProcessTransport) and (mon.rank, mon.world_size) == (0, 1)
    mon.close()


def _server(token=None):
    from gfservice.service.aggregator import Aggregator
    from gfservice.service.peer_server import PeerServer

    return PeerServer(Aggregator(), token=token, hello_timeout_s=2.0)


def test_a_wrong_token_is_refused_and_the_sender_drops_and_counts():
    from gfservice.training.peer_sender import MAX_REFUSALS, PeerSender
    from gfservice.wire import Layout, StepReport

    server = _server(token="right")
    server.admit("tok", "a", 1, "job-secret")
    sender = PeerSender("tok", 0, "a", lambda: (server.address, "job-secret"), token="wrong")
    sender.send(Layout(run="tok", rank=0, world_size=1, layers=["w"], numel=[1], sharded=[False], attempt="a"))
    for step in range(3):
        sender.send(StepReport(run="tok", rank=0, step=step, attempt="a"))
    sender.close()
    assert 1 <= server.refused <= MAX_REFUSALS and sender.dropped == 3 and server.aggregator.runs() == []
    server.close()


def test_a_dead_rank_0_costs_the_other_ranks_nothing_but_counted_drops():
    from gfservice.training.peer_sender import PeerSender
    from gfservice.wire import Layout, StepReport

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    sender = PeerSender("gone", 1, "", lambda: (dead, "x"), queue_size=4)
    sender.send(Layout(run="gone", rank=1, world_size=2, reports_layers=False))
    t0 = time.perf_counter()
    for step in range(10):
        sender.send(StepReport(run="gone", rank=1, step=step))
    assert time.perf_counter() - t0 < 0.05  # the training thread only appends
    sender.close()
    assert sender.dropped == 10 and sender.sent == 0


def test_bad_frames_close_only_their_connection():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from gfservice.service.peer_server import encode_frame, handshake, read_frame

    server = _server()
    key = server.admit("ok", "", 1, "job-secret")

    def connect():
        sock = socket.create_connection(server.sockaddr)
        handshake(sock, key, "ok", 0, "")
        return sock

    @settings(max_examples=25, deadline=None)
    @given(st.binary(max_size=64))
    def garbage_after_hello(data):
        with connect() as sock:
            sock.sendall(struct.pack(">I", len(data)) + data)
            sock.shutdown(socket.SHUT_WR)
            try:
                answer = read_frame(sock)
            except (EOFError, ConnectionError):
                return  # closed: the frame was not a request
            assert isinstance(answer, dict) and "rejected" in answer

    garbage_after_hello()
    with connect() as sock:  # too big: refused before it is read
        sock.sendall(struct.pack(">I", 2**31))
        sock.settimeout(5)
        assert sock.recv(1) == b""
    with connect() as sock:  # still serving, and right
        lay = {"kind": "layout", "run": "ok", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [1],
               "sharded": [False]}
        sock.sendall(encode_frame({"run": "ok", "messages": [lay, {"kind": "nope"}], "dropped": 2}))
        assert read_frame(sock)["rejected"] == [[1, "unauthorized"]]  # it names no run: not this connection's
        nope = {"kind": "nope", "run": "ok", "rank": 0}
        sock.sendall(encode_frame({"run": "ok", "messages": [nope], "dropped": 0}))
        assert read_frame(sock)["rejected"] == [[0, "unknown_kind"]]
    assert server.bad_frames >= 1 and server.aggregator.runs()[0]["run"] == "ok"
    server.close()


if __name__ == "__main__":  # under torchrun
    worker(sys.argv[1])
