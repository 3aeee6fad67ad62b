"""Soak: one service under a large job's steady load for a set time; does it leak, lose data or slow down?

A plain-Python ``ServiceHost`` (no Ray; state directory in a temporary directory, snapshots on, ``/metrics``
served on a free loopback port) takes the reports of ``--ranks`` 256 simulated ranks x ``--layers`` 1,000 layers
for ``--seconds`` 600 s, while the program scrapes ``/metrics`` once a second and samples its own memory.

The load is an FSDP-style sharded run: every rank reports all 1,000 layers (its shard's statistics) at
``--rate`` 1 step/s, deep statistics every 50 steps, so the service merges 256 reports per step: 256 k
layer-statistics/s. It is the heaviest layout a 256-rank job sends (DDP ranks other than rank 0 send only
heartbeats, 1/256 of this), at a step time typical of such jobs. ``--threads`` 4 sender threads each own a
contiguous block of ranks and submit, at each step's due time, their ranks' reports ``--batch`` 16 messages per
``ServiceHost.submit`` call. The messages come from ``rank_messages`` in ``benchmarks/transport.py``. Every
``--flap-every`` 50 steps rank 0 reports a NaN in one layer for one step: a critical ``nonfinite`` finding is
raised, cleared at the next step and snapshotted (findings request a snapshot; the ticker writes one every 5 s).

The aggregator keeps ``--history`` 100 merged steps (1,000 in the default configuration); the warm-up
(``--warmup``, default a quarter of the run and at least twice the history) fills it, so that memory measured
after it is the steady state.

Reported: memory (RSS) over time and its growth from the end of the warm-up to the end of the run; ``/metrics``
scrape latency p50/p99; snapshot write latency p50/p99 (``ServiceHost.snapshot``: state copy, JSON, fsync); messages
accepted/rejected/dropped, the sender threads' lag behind the schedule, and lost data: every accepted step merged
(the run's ``last_step``) with every rank's layers (the aggregator's ``layer_stats_merged``).

Targets (exit status 1 when one is missed): **memory growth after warm-up < 5%**, **lost: 0**, **scrape
p99 < 100 ms** (``--max-scrape-p99-ms``).

Run::

    .venv/bin/python benchmarks/soak.py                        # 10 minutes, 256 ranks x 1,000 layers
    .venv/bin/python benchmarks/soak.py --quick                # the smoke configuration: 60 s, 32 ranks
    .venv/bin/python benchmarks/soak.py --seconds 180          # a shorter full-size soak
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transport import rank_messages  # the one place that knows the wire format (imports torch)

from gfservice.config import Settings
from gfservice.hosting.actor import ServiceHost

RUN = "soak"
TARGET_GROWTH, TARGET_SCRAPE_MS = 0.05, 100.0
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class TimedCore(ServiceHost):
    """The service, with each snapshot write timed (the ticker's, the findings' and the last one alike)."""

    def __init__(self, settings: Settings):
        self.snapshot_s: list[float] = []
        self.snapshot_spans: list[tuple[float, float]] = []  # (start, end), time.monotonic()
        super().__init__(settings)

    def snapshot(self) -> bool:
        t0 = time.monotonic()
        ok = super().snapshot()
        self.snapshot_spans.append((t0, time.monotonic()))
        self.snapshot_s.append(self.snapshot_spans[-1][1] - t0)
        return ok


class Senders:
    """``threads`` threads, each submitting its block of ranks' reports at every step's due time."""

    def __init__(self, core: ServiceHost, args: argparse.Namespace):
        self.core, self.args = core, args
        self.steps = int(args.seconds * args.rate)
        self.ranks = [rank_messages(RUN, r, args.ranks, args.layers, args.deep_every) for r in range(args.ranks)]
        self.sent = self.rejected = self.flaps = 0
        self.lag_s = 0.0
        self.lock = threading.Lock()
        self.submit([layout for layout, _, _ in self.ranks])

    def submit(self, messages: list[dict[str, Any]]) -> None:
        for lo in range(0, len(messages), self.args.batch):
            ack = self.core.submit(messages[lo:lo + self.args.batch])
            with self.lock:
                self.sent += len(messages[lo:lo + self.args.batch])
                self.rejected += len(ack.rejected)

    def report(self, rank: int, step: int) -> dict[str, Any]:
        msg = self.ranks[rank][1](step)
        if rank == 0 and step % self.args.flap_every == self.args.flap_every // 2:  # a NaN layer, for one step
            nonfinite = np.zeros(self.args.layers, np.int64)
            nonfinite[self.args.layers // 2] = 3
            msg = {**msg, "stats": {**msg["stats"], "nonfinite": nonfinite}}
            self.flaps += 1
        return msg

    def start(self, t0: float) -> list[threading.Thread]:
        n = self.args.threads
        blocks = [range(i * self.args.ranks // n, (i + 1) * self.args.ranks // n) for i in range(n)]
        threads = [threading.Thread(target=self.loop, args=(t0, b), daemon=True) for b in blocks]
        for t in threads:
            t.start()
        return threads

    def loop(self, t0: float, ranks: range) -> None:
        for step in range(self.steps):
            due = t0 + step / self.args.rate
            time.sleep(max(0.0, due - time.monotonic()))
            with self.lock:
                self.lag_s = max(self.lag_s, time.monotonic() - due)
            self.submit([self.report(r, step) for r in ranks])


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the smoke configuration: 60 s, 32 ranks, history 20")
    p.add_argument("--seconds", type=float, help="how long to send (default 600, quick 60)")
    p.add_argument("--ranks", type=int, help="simulated ranks (default 256, quick 32)")
    p.add_argument("--layers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=1.0, help="steps per second per rank")
    p.add_argument("--threads", type=int, default=4, help="sender threads")
    p.add_argument("--batch", type=int, default=16, help="messages per ServiceHost.submit call")
    p.add_argument("--deep-every", type=int, default=50)
    p.add_argument("--flap-every", type=int, default=50, help="a NaN layer (then cleared) every N steps")
    p.add_argument("--history", type=int, help="merged steps the aggregator keeps (default 100, quick 20)")
    p.add_argument("--warmup", type=float, help="seconds before memory growth is measured (default: a quarter "
                   "of the run, at least twice the history)")
    p.add_argument("--max-scrape-p99-ms", type=float, default=TARGET_SCRAPE_MS)
    args = p.parse_args(argv)
    rss0 = rss_bytes()
    args.seconds = args.seconds or (60.0 if args.quick else 600.0)
    args.ranks = args.ranks or (32 if args.quick else 256)
    args.history = args.history or (20 if args.quick else 100)
    args.warmup = args.warmup or max(args.seconds / 4, 2 * args.history / args.rate)
    if args.warmup >= args.seconds * 0.9:
        p.error(f"--warmup {args.warmup:g} s leaves too little of a {args.seconds:g} s run to measure")

    with tempfile.TemporaryDirectory(prefix="gfsoak-") as tmp:
        settings = Settings.model_validate({"aggregator": {"history": args.history}, "service": {
            "state_dir": tmp, "metrics_port": 0, "metrics_addr": "127.0.0.1"}})
        core = TimedCore(settings)
        url = f"http://127.0.0.1:{core.metrics_port}/metrics"
        senders = Senders(core, args)
        print(f"soak: {args.ranks} ranks x {args.layers} layers (FSDP-sharded layouts), {args.rate:g} step/s per "
              f"rank, {args.seconds:g} s ({senders.steps} steps), {args.threads} sender threads, history "
              f"{args.history}, warm-up {args.warmup:g} s; /metrics at {url}", flush=True)
        t0 = time.monotonic()
        threads = senders.start(t0)
        samples: list[tuple[float, int]] = []  # (seconds since start, RSS)
        scrape_s: list[float] = []
        scrape_spans: list[tuple[float, float]] = []
        scrape_errors, body_bytes, tick, next_print = 0, 0, t0, t0
        while any(t.is_alive() for t in threads):
            tick += 1.0
            time.sleep(max(0.0, tick - time.monotonic()))
            s0 = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    body_bytes = len(resp.read())
                scrape_spans.append((s0, time.monotonic()))
                scrape_s.append(scrape_spans[-1][1] - s0)
            except OSError:
                scrape_errors += 1
            now = time.monotonic()
            samples.append((now - t0, rss_bytes()))
            if now >= next_print:
                next_print += max(10.0, args.seconds / 10)
                v = core.aggregator.view()
                last = v.runs[0].last_step if v.runs else -1
                print(f"  t={now - t0:5.0f} s  RSS {samples[-1][1] / 2**20:7.1f} MiB  last step merged {last:5d}  "
                      f"scrape {1e3 * scrape_s[-1] if scrape_s else float('nan'):6.1f} ms  snapshots "
                      f"{len(core.snapshot_s)}  load {os.getloadavg()[0]:.1f}", flush=True)
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        view = core.aggregator.view()  # before anything is flushed: what merged on its own
        run = next(r for r in view.runs if r.name == RUN)
        nonfinite = [f for f in core.aggregator.findings(RUN) if f.detector == "nonfinite"]
        other = {f.detector for f in core.aggregator.findings(RUN)} - {"nonfinite"}
        health = core.status().snapshot
        snap_size = os.path.getsize(core.settings.service.snapshot_path or "")
        core.shutdown()

    layer_stats = senders.steps * args.ranks * args.layers
    # reports sent but not merged whole (rejected, or missing from a merged step), counted in rank-reports
    lost = senders.rejected + -(-max(0, layer_stats - view.layer_stats_merged) // args.layers)
    lost += run.last_step != senders.steps - 1 and lost == 0
    after = [rss for t, rss in samples if t >= args.warmup]
    base, end = float(np.median(after[:10])), float(np.median(after[-10:]))
    growth = end / base - 1
    p99 = 1e3 * pct(scrape_s, 99)
    ok_mem, ok_lost = growth < TARGET_GROWTH, lost == 0
    ok_scrape = p99 < args.max_scrape_p99_ms and scrape_errors == 0
    print("memory over time (RSS, MiB):", "  ".join(f"{t:.0f}s {rss / 2**20:.0f}" for t, rss in
                                                 samples[:: max(1, len(samples) // 12)] + samples[-1:]))
    print(f"sent {senders.steps} steps x {args.ranks} ranks in {elapsed:.0f} s, sender lag max "
          f"{senders.lag_s:.2f} s; messages accepted {view.accepted}, rejected {senders.rejected} "
          f"{dict(view.rejected)}, dropped {run.sender_dropped}")
    print(f"lost: {lost} (last step merged {run.last_step} of {senders.steps - 1}; layer statistics merged "
          f"{view.layer_stats_merged} of {layer_stats}); target zero accepted data lost: "
          f"{'PASS' if ok_lost else 'MISS'}")
    print(f"findings: NaN flaps injected {senders.flaps}, nonfinite findings raised {len(nonfinite)} (active at the "
          f"end {sum(f.active for f in nonfinite)}), other detectors: {sorted(other) or 'none'}")
    print(f"memory: RSS after warm-up {base / 2**20:.1f} MiB, at the end {end / 2**20:.1f} MiB, peak "
          f"{max(r for _, r in samples) / 2**20:.1f} MiB ({rss0 / 2**20:.0f} MiB before the service: python, numpy, "
          f"torch): growth {100 * growth:+.2f}%, {(end - base) / 2**20:+.1f} MiB (target < "
          f"{100 * TARGET_GROWTH:g}%): {'PASS' if ok_mem else 'MISS'}")
    print(f"scrape /metrics ({body_bytes / 1024:.0f} KiB): {len(scrape_s)} scrapes, p50 {1e3 * pct(scrape_s, 50):.1f}"
          f" ms, p99 {p99:.1f} ms, max {1e3 * max(scrape_s, default=float('nan')):.1f} ms, errors {scrape_errors} "
          f"(target p99 < {args.max_scrape_p99_ms:g} ms): {'PASS' if ok_scrape else 'MISS'}")
    spans = core.snapshot_spans
    during = [b - a for a, b in scrape_spans if any(x < b and a < y for x, y in spans)]
    apart = [b - a for a, b in scrape_spans if not any(x < b and a < y for x, y in spans)]
    print(f"  scrapes overlapping a snapshot write: {len(during)}, p50 {1e3 * pct(during, 50):.1f} ms, p99 "
          f"{1e3 * pct(during, 99):.1f} ms; the others: {len(apart)}, p50 {1e3 * pct(apart, 50):.1f} ms, p99 "
          f"{1e3 * pct(apart, 99):.1f} ms")
    print(f"snapshots ({snap_size / 1024:.0f} KiB): {len(core.snapshot_s)} writes, p50 "
          f"{1e3 * pct(core.snapshot_s, 50):.1f} ms, p99 {1e3 * pct(core.snapshot_s, 99):.1f} ms, failures "
          f"{health.failures:.0f}")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()} on {os.cpu_count()} CPUs")
    ok = ok_mem and ok_lost and ok_scrape
    print(f"verdict: {'PASS' if ok else 'MISS'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
