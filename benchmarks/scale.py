"""gfservice at scale, three quick parts (each well under a minute; ``--quick`` for a smoke run):

1. **Many tensors**: the per-step cost of ``monitor.step()`` for a model of ``--tensors`` 10,000 parameter
   tensors (256 elements each, gradients fixed), on the CPU: the one-``_foreach_norm`` floor, the monitor with
   a transport that only queues (the training thread with a service attached) and in-process (aggregator and
   detectors on their background thread). Mean of ``--calls`` calls, alternating, median over rounds.
2. **Ingest**: an in-process :class:`~gfservice.service.aggregator.Aggregator` (built-in detectors on) takes
   the reports of one sharded run of ``--ranks`` 1,024 ranks x ``--layers`` 1,000 layers: the messages are built
   once (plain dicts, as ``RaySender`` ships them), then submitted for ``--steps`` steps; the rate in
   layer-statistics per second and steps merged per second.
3. **Scrape**: ``--runs`` 1,000 live runs (100 layers each, a few steps) in one aggregator; the time of one
   Prometheus scrape (``GradflowCollector`` + ``generate_latest``), median of ``--scrapes``, and its size.

Run::

    .venv/bin/python benchmarks/scale.py            # about two minutes on 2 cores
    .venv/bin/python benchmarks/scale.py --quick    # smaller counts: a smoke run
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from peers import EnqueueTransport
from transport import rank_messages

import gfservice
from gfservice.training.monitoring import Monitor, MonitorOptions


def many_tensors(n_tensors: int, calls: int, rounds: int) -> list[str]:
    model = torch.nn.ParameterList(torch.nn.Parameter(torch.zeros(256)) for _ in range(n_tensors))
    gen = torch.Generator().manual_seed(0)
    for p in model:
        p.grad = torch.randn(256, generator=gen)
    grads = [p.grad for p in model]
    enqueue = Monitor(model, None, EnqueueTransport(), MonitorOptions(run="scale-enqueue", deep_every=0))
    inproc = gfservice.monitor(model, None, run="scale-inprocess", service=None, deep_every=0)
    loss = torch.tensor(1.0)
    variants = {
        "floor (_foreach_norm)": lambda: torch._foreach_norm(grads, 2),
        "monitor, queue only (service attached)": lambda: enqueue.step(loss=loss),
        "monitor, in-process": lambda: inproc.step(loss=loss),
    }
    samples: dict[str, list[float]] = {k: [] for k in variants}
    for f in variants.values():
        f()
    for r in range(rounds):
        names = list(variants)[r % 3:] + list(variants)[:r % 3]
        for name in names:
            t0 = time.perf_counter()
            for _ in range(calls):
                variants[name]()
            samples[name].append((time.perf_counter() - t0) / calls)
    inproc.close()
    enqueue.close()
    floor = statistics.median(samples["floor (_foreach_norm)"])
    lines = [f"**1. {n_tensors} parameter tensors** ({n_tensors * 256 / 1e6:.2f}M parameters; mean of {calls} "
             f"calls, median of {rounds} rounds)", "", "| call | ms per step | vs floor |", "|---|---|---|"]
    for name, s in samples.items():
        m = statistics.median(s)
        lines.append(f"| {name} | {m * 1e3:.2f} | {m / floor:.2f}x |")
    lines.append(f"\nmonitor errors: {enqueue.errors + inproc.errors}")
    return lines


def ingest(ranks: int, layers: int, steps: int) -> list[str]:
    from gfservice.config import Settings
    from gfservice.service.aggregator import Aggregator

    settings = Settings()
    agg = Aggregator(settings.aggregator, settings.detectors)
    msgs = [rank_messages("scale-ingest", r, ranks, layers, deep_every=50) for r in range(ranks)]
    rejected = sum(not agg.submit(layout).accepted for layout, _, _ in msgs)
    t0 = time.perf_counter()
    batches = [[report(s) for _, report, _ in msgs] for s in range(1, steps + 1)]  # built once, before timing
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for batch in batches:
        for m in batch:
            rejected += not agg.submit(m).accepted
    sec = time.perf_counter() - t0
    rejected += sum(not agg.submit(end).accepted for _, _, end in msgs)
    merged = agg.counters().get("layer_stats_merged")
    rate = ranks * layers * steps / sec
    return [f"**2. ingest, {ranks} ranks x {layers} layers**, {steps} steps ({ranks * steps} reports, built in "
            f"{build:.1f} s beforehand)", "",
            f"- {sec:.2f} s: {rate / 1e6:.2f} M layer-statistics/s, {steps / sec:.2f} merged steps/s, "
            f"{ranks * steps / sec:.0f} reports/s; rejected {rejected}; layer-statistics merged {merged}"]


def scrape(runs: int, layers: int, scrapes: int) -> list[str]:
    from prometheus_client import CollectorRegistry, generate_latest

    from gfservice.observability.exporter import GradflowCollector
    from gfservice.service.aggregator import Aggregator
    from gfservice.wire import Layout, StepReport

    agg = Aggregator()
    rng = np.random.default_rng(0)
    count = np.full(layers, 4096, np.int64)
    t0 = time.perf_counter()
    for i in range(runs):
        name = f"scale-run-{i}"
        agg.submit(Layout(run=name, rank=0, world_size=1, layers=[f"l{j}.weight" for j in range(layers)],
                          numel=[4096] * layers, sharded=[False] * layers))
        for s in range(3):
            rms = np.geomspace(1e-3, 1e-2, layers) * np.exp(rng.normal(0, 0.05, layers))
            agg.submit(StepReport(run=name, rank=0, step=s, loss=2.0, lr=1e-3, stats={
                "count": count, "sum_sq": rms**2 * count, "max_abs": 4 * rms, "nonfinite": np.zeros(layers, np.int64)}))
    fill = time.perf_counter() - t0
    reg = CollectorRegistry(auto_describe=False)
    reg.register(GradflowCollector(agg))
    times, size = [], 0
    for _ in range(scrapes):
        t0 = time.perf_counter()
        size = len(generate_latest(reg))
        times.append(time.perf_counter() - t0)
    return [f"**3. scrape, {runs} live runs x {layers} layers** (filled in {fill:.1f} s)", "",
            f"- one scrape: median {statistics.median(times) * 1e3:.0f} ms, max {max(times) * 1e3:.0f} ms "
            f"(of {scrapes}); {size / 1e6:.2f} MB of exposition text"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tensors", type=int, default=10_000)
    ap.add_argument("--calls", type=int, default=None, help="1. calls per sample (default 20, quick 3)")
    ap.add_argument("--ranks", type=int, default=None, help="2. ranks (default 1024, quick 64)")
    ap.add_argument("--layers", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=None, help="2. steps (default 3, quick 2)")
    ap.add_argument("--runs", type=int, default=None, help="3. live runs (default 1000, quick 50)")
    ap.add_argument("--scrapes", type=int, default=None, help="3. scrapes (default 5, quick 2)")
    ap.add_argument("--part", choices=("all", "tensors", "ingest", "scrape"), default="all")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("gfservice").setLevel(logging.ERROR)
    q = args.quick
    print(f"# gfservice at scale: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}, {args.threads} torch threads\n")
    if args.part in ("all", "tensors"):
        print("\n".join(many_tensors(args.tensors if not q else min(args.tensors, 2000),
                                     args.calls or (3 if q else 20), 3)) + "\n")
    if args.part in ("all", "ingest"):
        print("\n".join(ingest(args.ranks or (64 if q else 1024), args.layers if not q else 200,
                               args.steps or 2 if q else args.steps or 3)) + "\n")
    if args.part in ("all", "scrape"):
        print("\n".join(scrape(args.runs or (50 if q else 1000), 100, args.scrapes or (2 if q else 5))) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
