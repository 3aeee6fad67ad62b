"""A fleet sharded by run (issue 24, part 3): live runs spread over ``--shards`` aggregator actors, and one
Prometheus scrape of each shard's ``/metrics``.

Everything is real: a local Ray cluster, the service's shard actors started as ``gfservice serve --shards N``
starts them (:func:`gfservice.hosting.actor.start`), runs fed through ``gfservice.connect()`` (the client sends
each message to its run's shard), and each scrape a real HTTP GET of a shard's ``/metrics`` with the headers
Prometheus sends (OpenMetrics, gzip). For each shard count the fleet grows to each of ``--runs`` live runs
(``--layers`` layers, two steps each); then

- **fresh**: every run gets one more step, then each shard is scraped once (every run's lines are formatted
  anew: the worst case, every run of the fleet stepped within one scrape interval);
- **steady**: each shard scraped again with no new step (a run's lines are kept while it does not change).

Before the scrapes the benchmark waits until the shards are idle (their detectors and snapshots done with what
they were sent), so that a scrape is timed alone. Snapshots every 30 s. Shards are scraped one after the other,
as Prometheus scrapes each target on its own schedule; on this machine
every shard shares the same two cores with the others and the feeder, where a real fleet gives each shard actor
its own core. Last, one shard is killed (``ray.kill``, Ray restarts it) and the runs it holds come back from its
snapshot: the time until they are all listed again, and how many were lost.

Run::

    .venv/bin/python benchmarks/fleet.py                             # shards 1 2 4 8, runs 1000 5000 10000
    .venv/bin/python benchmarks/fleet.py --shards 2 --runs 200 500   # a smoke run
"""

from __future__ import annotations

import argparse
import gzip
import logging
import os
import statistics
import tempfile
import time
import urllib.request

import numpy as np

PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0;q=0.5,application/openmetrics-text;version=0.0.1;"
                     "q=0.4,text/plain;version=0.0.4;q=0.3,*/*;q=0.2")


def scrape(address: str) -> tuple[float, int, int]:
    """One GET of ``http://address/metrics`` as Prometheus sends it: (seconds, bytes on the wire, series)."""
    req = urllib.request.Request(f"http://{address}/metrics",
                                 headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=60) as resp:
        body = resp.read()
    seconds = time.perf_counter() - t0
    text = gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body
    series = sum(1 for ln in text.splitlines() if ln and not ln.startswith(b"#"))
    return seconds, len(body), series


def messages(names: list[str], layers: int, step: int, rng: np.random.Generator) -> list:
    from gfservice.wire import Layout, StepReport

    count = np.full(layers, 4096, np.int64)
    out: list = []
    for name in names:
        if step == 0:
            out.append(Layout(run=name, rank=0, world_size=1, layers=[f"l{j}.weight" for j in range(layers)],
                              numel=[4096] * layers, sharded=[False] * layers))
        rms = np.geomspace(1e-3, 1e-2, layers) * np.exp(rng.normal(0, 0.05, layers))
        out.append(StepReport(run=name, rank=0, step=step, loss=2.0, lr=1e-3, stats={
            "count": count, "sum_sq": rms**2 * count, "max_abs": 4 * rms, "nonfinite": np.zeros(layers, np.int64)}))
    return out


def feed(client, names: list[str], layers: int, steps: range, rng: np.random.Generator, batch: int = 200) -> float:
    """Send ``steps`` of every run in ``names`` through the client; seconds taken."""
    t0 = time.perf_counter()
    for step in steps:
        for i in range(0, len(names), batch):
            answer = client.submit(messages(names[i:i + batch], layers, step, rng))
            if answer["rejected"]:
                raise RuntimeError(f"the fleet refused messages: {answer['rejected'][:3]}")
    return time.perf_counter() - t0


def scrape_all(addresses: list[str]) -> list[tuple[float, int, int]]:
    return [scrape(a) for a in addresses]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_idle(pids: list[int], timeout_s: float = 300.0) -> None:
    """Wait until the shards are done with what they were sent (detectors, snapshots): each used under 5% of a
    core over half a second. The scrape is then timed alone, not against the shard's own backlog."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        before = [cpu_seconds(p) for p in pids]
        time.sleep(0.5)
        if all(cpu_seconds(p) - b < 0.025 for p, b in zip(pids, before, strict=True)):
            return


def row(shards: int, runs: int, layers: int, fresh: list, steady: list, fed_s: float, memory: float) -> str:
    load = os.getloadavg()[0]
    f = [s for s, _, _ in fresh]
    st = [s for s, _, _ in steady]
    series = sum(n for _, _, n in fresh)
    return (f"| {shards} | {runs:,} | {runs // shards:,} | {max(f):.2f} s (median {statistics.median(f):.2f}) | "
            f"{max(st):.2f} s | {sum(b for _, b, _ in fresh) / 1e6 / shards:.1f} MB | {series:,} | "
            f"{memory / 1e6:.0f} MB | {fed_s:.0f} s | {load:.1f} |")


def shard_memory(client) -> float:
    """The largest resident set of a shard actor process (bytes)."""
    pids = [s["pid"] for s in client.status().get("shards", [])] or [client.status()["pid"]]
    rss = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                rss += [int(ln.split()[1]) * 1024 for ln in fh if ln.startswith("VmRSS:")]
        except OSError:
            pass
    return max(rss, default=0)


def run_fleet(shards: int, sizes: list[int], layers: int, kill: bool) -> list[str]:
    import ray

    from gfservice.config import Settings
    from gfservice.hosting import actor as svc
    from gfservice.service.client import connect, find

    state = tempfile.mkdtemp(prefix="gf-fleet-bench-")
    name = f"gf-fleet-{shards}"
    settings = Settings.model_validate({
        "aggregator": {"max_runs": max(sizes) + 1, "max_memory_bytes": 0, "history": 10},
        "service": {"name": name, "namespace": "gf-fleet-bench", "state_dir": state, "shards": shards,
                    "metrics_port": 0, "snapshot_interval_s": 30.0}})
    rng = np.random.default_rng(shards)
    lines = []
    svc.start(settings)
    try:
        client = connect(name=name, namespace="gf-fleet-bench", timeout_s=300)
        status = client.status()
        addresses = [s["metrics"] for s in status["shards"]] if "shards" in status else [status["metrics"]]
        pids = [s["pid"] for s in status["shards"]] if "shards" in status else [status["pid"]]
        have: list[str] = []
        for size in sizes:
            new = [f"bench-{len(have) + i:05d}" for i in range(size - len(have))]
            fed = feed(client, new, layers, range(2), rng)  # the new runs: a layout and two steps
            have += new
            k = 2 + sizes.index(size)  # then one more step of every run, so that every run changed since
            fed += feed(client, have, layers, range(k, k + 1), rng)  # the last scrape
            wait_idle(pids)
            fresh = scrape_all(addresses)
            steady = scrape_all(addresses)
            lines.append(row(shards, size, layers, fresh, steady, fed, shard_memory(client)))
            print(lines[-1], flush=True)
        if kill:
            lines.append(kill_one(client, find, ray, name, len(have)))
            print(lines[-1], flush=True)
    finally:
        svc.stop(name, "gf-fleet-bench")
    return lines


def kill_one(client, find, ray, name: str, total: int) -> str:
    """Kill the last shard (Ray restarts it); the time until every run is listed again, and the runs lost."""
    victim = list(client.shards)[-1]
    handle = find(victim, "gf-fleet-bench")
    fed = time.time()
    deadline = fed + 120
    while (ray.get(handle.status.remote(), timeout=300)["snapshot"]["last_success"] or 0) < fed:
        assert time.time() < deadline, "no snapshot in two minutes"
        time.sleep(0.5)  # a snapshot taken after the last step: the runs a restart must bring back
    before = ray.get(handle.status.remote(), timeout=300)
    held = len(before["runs"])
    t0 = time.time()
    ray.kill(handle, no_restart=False)
    while True:
        try:
            after = ray.get(handle.status.remote(), timeout=10)
            if after["pid"] != before["pid"]:
                break
        except Exception:  # the shard restarting
            pass
        time.sleep(0.2)
    back = time.time() - t0
    listed = {r["run"] for r in client.runs()}
    return (f"\nkilled shard {victim} ({held:,} runs): back in {back:.1f} s with {after['restored_runs']:,} runs "
            f"restored from its snapshot; the client lists {len(listed):,} of {total:,} runs "
            f"({total - len(listed)} lost)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--runs", type=int, nargs="+", default=[1000, 5000, 10_000])
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--no-kill", action="store_true", help="skip the shard restart")
    args = ap.parse_args(argv)
    logging.getLogger("gfservice").setLevel(logging.ERROR)
    import ray

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    print(f"# gfservice fleet: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, {args.layers} layers per run\n")
    print("| shards | live runs | runs per shard | scrape, fresh (slowest shard) | scrape, steady | "
          "per shard on the wire (gzip) | series | largest shard RSS | fed in | load average |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    try:
        for i, shards in enumerate(args.shards):
            run_fleet(shards, sorted(args.runs), args.layers, kill=not args.no_kill and i == len(args.shards) - 1)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
