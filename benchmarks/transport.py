"""The Ray transport: what the training thread pays in ``monitor.step``, and what one service ingests.

The program starts a private local Ray (``ray.init(address="local", num_cpus=2)``) and the service in it with
``gfservice.hosting.actor.start`` (no metrics port, snapshots to a temporary directory), then measures:

(a) **Training thread.** A small MLP (8 parameter tensors, CPU, one torch thread) trains at ``--rate`` 10
    steps/s (sleeping between steps) with ``gfservice.monitor(model, opt, run=..., service="auto")``, which
    finds the service and ships through ``RaySender``; the baseline is the same loop with ``service=None``
    (in-process aggregator and detectors in the training thread). The two alternate in rounds. Each
    ``monitor.step`` call is timed (``Timer`` cannot pace a loop); the samples, less the first 5 of each
    round, become a ``torch.utils.benchmark.Measurement``. Targets: median under 1 ms with the service;
    reports dropped 0.
(b) **Service ingest.** Synthetic healthy reports of a sharded run, ``--ranks`` 4 x ``--layers`` 1000, ranks
    in lock step, ``--batch`` steps per rank per call, deep statistics every 50 steps, built-in detectors on.
    ``Timer.blocked_autorange`` times one deep cycle (50 steps of every rank) through the in-process
    ``Aggregator.submit`` (the baseline) and through the Ray actor (``handle.submit.remote``, as ``RaySender``
    calls it). Target: >= 1 M layer-statistics/s through Ray; no rejections, every report merged.

All wire messages are built by :func:`rank_messages`, the one place that knows the wire format.

Run::

    .venv/bin/python benchmarks/transport.py            # about 2 minutes
    .venv/bin/python benchmarks/transport.py --quick    # under a minute
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from torch.utils.benchmark import Measurement

TARGET_MS, TARGET_RATE = 1.0, 1e6
WARMUP = 5  # (a) first steps of each round left out

Message = dict[str, Any]


def rank_messages(run: str, rank: int, world: int, layers: int, deep_every: int
                  ) -> tuple[Message, Callable[[int], Message], Message]:
    """What one rank of a sharded run ships, as the plain dicts ``RaySender`` sends (``dict(message)``): its
    layout, its report of step ``s`` (deep statistics every ``deep_every`` steps) and its run end.

    Healthy, steady gradients: layer scales spread over a decade and move a few percent from step to step,
    so the built-in detectors evaluate every step and raise nothing.
    """
    from gfservice.stats import EXP_BINS
    from gfservice.wire import Layout, RunEnd, StepReport

    kinds = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.out")
    names = [f"blocks.{i // 4}.{kinds[i % 4]}.weight" for i in range(layers)]
    layout = Layout(run=run, rank=rank, world_size=world, layers=names, numel=[4096] * layers,
                    sharded=[True] * layers)
    rng = np.random.default_rng(rank)
    count, zeros = np.full(layers, 4096 // world, np.int64), np.zeros(layers, np.int64)
    hist = np.zeros((layers, EXP_BINS), np.int64)
    hist[:, 115:120] = count[:, None] // 5
    core: list[Message] = []
    deep: list[Message] = []
    for _ in range(4):
        rms = np.geomspace(1e-3, 1e-2, layers) * np.exp(rng.normal(0, 0.05, layers))
        stats = {"count": count, "sum_sq": rms**2 * count, "max_abs": 4 * rms, "nonfinite": zeros}
        deep_stats = {**stats, "sum_abs": 0.8 * rms * count, "zeros": zeros, "exp_hist": hist, "dead_units": zeros,
                      "weight_sq": np.full(layers, 4.0), "update_sq": np.full(layers, 4e-6)}
        for pool, s in ((core, stats), (deep, deep_stats)):
            pool.append(dict(StepReport(run=run, rank=rank, step=0, stats=s, loss=2.0, lr=1e-3, step_time=0.1)))

    def report(step: int) -> Message:
        pool = deep if deep_every and step % deep_every == 0 else core
        return {**pool[step % len(pool)], "step": step, "time": time.time()}

    return dict(layout), report, dict(RunEnd(run=run, rank=rank))


# ---- (a) the training thread ----------------------------------------------------------------------
def paced_training(service: str | None, run: str, steps: int, rate: float) -> tuple[list[float], Any]:
    """``steps`` steps of a small MLP at ``rate`` steps/s; the seconds of each ``monitor.step`` call."""
    import gfservice

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256),
                          nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    mon = gfservice.monitor(model, opt, run=run, service=service)
    times = []
    tick = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        t0 = time.perf_counter()
        mon.step(loss=loss)
        times.append(time.perf_counter() - t0)
        opt.zero_grad()
        tick += 1.0 / rate
        time.sleep(max(0.0, tick - time.perf_counter()))
    mon.close()
    return times, mon


def training_thread(client: Any, args: argparse.Namespace) -> tuple[list[Measurement], str, bool]:
    from torch.utils.benchmark import Measurement, TaskSpec  # imports setuptools: only where timing is done

    variants = {"service over Ray": "auto", "in-process (service=None)": None}
    runs: list[Measurement] = []
    dropped = rejected = missing = errors = 0
    for r in range(args.rounds):
        for name, service in list(variants.items())[:: -1 if r % 2 else 1]:
            run = f"bench-thread-{r}-{'ray' if service else 'local'}"
            times, mon = paced_training(service, run, args.steps, args.rate)
            spec = TaskSpec("monitor.step(loss=loss)", "", label=f"(a) monitor.step in the training thread, "
                            f"MLP at {args.rate:g} steps/s", sub_label=name, description="monitor.step")
            runs.append(Measurement(1, times[WARMUP:], spec))
            errors += mon.errors
            if service:
                if type(mon.transport).__name__ != "RaySender":
                    raise SystemExit(f"service='auto' did not find the service: {type(mon.transport).__name__}")
                row = {x["run"]: x for x in client.runs()}.get(run, {})
                dropped += max(mon.transport.dropped, row.get("sender_dropped", 0))
                rejected += sum(mon.transport.rejected.values())
                missing += args.steps - 1 - row.get("last_step", -1)
    merged = Measurement.merge(runs)
    lines = [f"(a) {m.task_spec.sub_label}: median {1e3 * m.median:.3f} ms, p99 {1e3 * np.percentile(m.times, 99):.3f}"
             f" ms over {len(m.times)} steps" for m in merged]
    median_ms = {m.task_spec.sub_label: 1e3 * m.median for m in merged}
    ray_ms, base_ms = median_ms["service over Ray"], median_ms["in-process (service=None)"]
    ok = ray_ms < TARGET_MS and dropped + rejected + missing + errors == 0
    lines.append(f"(a) service over Ray / in-process: {ray_ms / base_ms:.2f}x; reports dropped {dropped}, rejected "
                 f"{rejected}, steps missing at the service {missing}, monitor errors {errors}; target median < "
                 f"{TARGET_MS:g} ms and nothing lost: {'PASS' if ok else 'MISS'}")
    return merged, "\n".join(lines), ok


# ---- (b) service ingest ---------------------------------------------------------------------------
class Ranks:
    """The ranks of one synthetic run; ``cycle()`` sends the next deep cycle of steps in lock-step rounds."""

    def __init__(self, send: Callable[[list[list[Message]]], int], run: str, args: argparse.Namespace):
        self.send, self.args, self.run, self.step = send, args, run, 0
        self.ranks = [rank_messages(run, r, args.ranks, args.layers, args.deep_every) for r in range(args.ranks)]
        self.rejected = send([[layout] for layout, _, _ in self.ranks])

    def cycle(self) -> None:
        a, s0 = self.args, self.step
        for lo in range(s0, s0 + a.deep_every, a.batch):
            steps = range(lo, min(lo + a.batch, s0 + a.deep_every))
            self.rejected += self.send([[report(s) for s in steps] for _, report, _ in self.ranks])
        self.step = s0 + a.deep_every

    def end(self) -> int:
        """Send every rank's run end; the layer-statistics sent so far."""
        self.rejected += self.send([[end] for _, _, end in self.ranks])
        return self.step * self.args.ranks * self.args.layers


def ingest(handle: Any, client: Any, args: argparse.Namespace) -> tuple[list[Measurement], str, bool]:
    import ray
    from torch.utils.benchmark import Measurement, Timer

    from gfservice.config import Settings
    from gfservice.service.aggregator import Aggregator

    settings = Settings()
    agg = Aggregator(settings.aggregator, settings.detectors)

    def local(batches: list[list[Message]]) -> int:
        return sum(not agg.submit(m).accepted for batch in batches for m in batch)

    def remote(batches: list[list[Message]]) -> int:  # one call in flight per rank, as each RaySender has
        return sum(len(a["rejected"]) for a in ray.get([handle.submit.remote(b, None) for b in batches]))

    before = client.status()["counters"]["layer_stats_merged"]
    sides = {"in-process Aggregator.submit": Ranks(local, "bench-ingest-local", args),
             "Ray actor handle.submit": Ranks(remote, "bench-ingest-ray", args)}
    label = f"(b) service ingest, {args.ranks} ranks x {args.layers} layers, {args.batch} steps per call"
    runs = []
    for r in range(args.rounds):
        for name, ranks in list(sides.items())[:: -1 if r % 2 else 1]:
            timer = Timer("cycle()", globals={"cycle": ranks.cycle}, label=label, sub_label=name,
                          description=f"{args.deep_every} steps (one deep cycle)")
            runs.append(timer.blocked_autorange(min_run_time=args.seconds))
    sent = {name: ranks.end() for name, ranks in sides.items()}
    merged = {"in-process Aggregator.submit": agg.counters()["layer_stats_merged"],
              "Ray actor handle.submit": client.status()["counters"]["layer_stats_merged"] - before}
    rejected = sum(ranks.rejected for ranks in sides.values())
    findings = sum(r["active_findings"] for r in agg.runs() + client.runs() if r["run"].startswith("bench-ingest"))
    results = Measurement.merge(runs)
    rate = {m.task_spec.sub_label: args.ranks * args.layers * args.deep_every / m.median for m in results}
    base, ray_rate = rate["in-process Aggregator.submit"], rate["Ray actor handle.submit"]
    ok = ray_rate >= TARGET_RATE and rejected == 0 and merged == sent
    line = (f"(b) layer-statistics/s (median cycle): in-process {base / 1e6:.2f} M/s (baseline), through Ray "
            f"{ray_rate / 1e6:.2f} M/s ({ray_rate / base:.2f}x); rejected {rejected}; every report merged: "
            f"{merged == sent}; active findings {findings}; target >= {TARGET_RATE / 1e6:g} M/s through Ray: "
            f"{'PASS' if ok else 'MISS'}")
    return results, line, ok


def main(argv: list[str] | None = None) -> int:
    from torch.utils.benchmark import Compare

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and shorter ingest blocks")
    p.add_argument("--rate", type=float, default=10.0, help="(a) training steps per second")
    p.add_argument("--steps", type=int, help="(a) steps per variant per round (default 150, quick 40)")
    p.add_argument("--rounds", type=int, default=2, help="rounds, the variants alternating")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--layers", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16, help="(b) steps per rank per submit call")
    p.add_argument("--deep-every", type=int, default=50)
    p.add_argument("--seconds", type=float, help="(b) seconds per Timer block (default 10, quick 2)")
    args = p.parse_args(argv)
    args.steps = args.steps or (40 if args.quick else 150)
    args.seconds = args.seconds or (2.0 if args.quick else 10.0)
    torch.set_num_threads(1)

    import ray

    from gfservice.config import ServiceConfig, Settings
    from gfservice.hosting import actor
    from gfservice.service.client import Client

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    try:
        with tempfile.TemporaryDirectory(prefix="gfbench-") as tmp:
            settings = Settings(service=ServiceConfig(metrics_port=None, sd_file="",
                                                      snapshot_path=os.path.join(tmp, "snapshot.json")))
            handle, _ = actor.start(settings)
            client = Client(handle)
            thread, thread_line, thread_ok = training_thread(client, args)
            rates, rates_line, rates_ok = ingest(handle, client, args)
            actor.stop(settings.service.name, settings.service.namespace)
    finally:
        ray.shutdown()
    Compare(thread + rates).print()
    print(f"{thread_line}\n{rates_line}")
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()} on {os.cpu_count()} CPUs")
    return 0 if thread_ok and rates_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
