"""The Ray transport and the service under load: what the training thread pays, and what one service takes.

Measured in one run, on a private local Ray cluster (``num_cpus=4``, own temp dir so that no other
``ray.init(address="auto")`` on the machine attaches to it), with the service started by
``gfservice.service.start`` (no metrics port, snapshots to a private temp dir as in production):

1. **Training-thread cost** of ``Monitor.step`` for a real small torch model (an MLP, CPU,
   ``torch.set_num_threads(1)``) stepping at ``--rate`` steps/s (10 by default, paced by sleeping) in this
   process, attached to the cluster: ``gfservice.monitor(model, opt, run=..., service="auto")`` finds the
   service and ships through :class:`gfservice.training.ray_sender.RaySender`. Each ``monitor.step`` call is timed
   with ``time.perf_counter``; ``Monitor.overhead_s`` (which also counts the optimizer pre-hook) is read per
   step too. The same loop with ``service=None`` (in-process aggregator and detectors on the training
   thread) is the baseline, and the loop without a monitor gives the whole-iteration reference (the sender
   thread's share of the GIL shows there, not inside ``monitor.step``). The variants alternate in rounds so
   that machine noise hits them alike. Drops (``monitor.transport.dropped``) and rejections must be 0, and
   the service must hold every step.
2. **Service ingest, merge and detect rate** with synthetic senders: ``--runs`` Ray actors, each driving the
   ``--ranks`` ranks of a sharded (FSDP-like) run of ``--layers`` layers, send pre-validated message dicts (a
   :class:`~gfservice.wire.Layout` once, then ``dict(StepReport(...))`` exactly as ``RaySender.send`` makes
   them, deep statistics every ``--deep-every`` steps) through the actor method the sender uses,
   ``handle.submit.remote(batch, None)``: each rank ``--batch`` steps per call, one call in flight per rank,
   the ranks of a run in lock step (a collective holds real ranks together). The rate is
   ``status()["counters"]["layer_stats_merged"]`` before and after a steady window of ``--duration`` seconds,
   with the built-in detectors on. The bare in-process ``Aggregator.submit`` loop (no Ray) on the same
   messages is the baseline, so that Ray's share is visible. The service's CPU seconds in the window
   (``/proc/PID/stat``) give a rate per CPU second, which says more than the wall rate on a loaded machine.

Run ``python benchmarks/transport.py`` (about 3 minutes) or ``--quick`` (about 1 minute); ``--json PATH``
writes every figure; ``--profile DIR`` records the service actor with ``py-spy`` during the ingest window.
The load average (``os.getloadavg()``) is printed beside the figures: on a shared 2-core machine read them
with it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

TARGETS = {"monitor_median_ms": 1.0, "ingest_layer_stats_per_s": 1_000_000}


# ---- options ------------------------------------------------------------------------------------
@dataclass
class Options:
    quick: bool = False
    rate: float = 10.0  # training steps per second (paced)
    rounds: int = 3  # monitor rounds per variant, alternating
    steps: int = 100  # monitor steps per round
    warmup_steps: int = 5  # first steps of each round left out of the statistics
    spin: bool = False  # pace by spinning (a busy training thread) instead of sleeping
    layers: int = 1000  # synthetic senders: layers per rank
    ranks: int = 4
    runs: int = 1
    batch: int = 16  # steps per submit call
    max_pending_steps: int = 16  # the service's merge window (AggregatorConfig's default)
    deep_every: int = 50
    duration: float = 20.0  # seconds of the measured ingest window
    warmup: float = 3.0  # seconds of sending before the window opens
    local_duration: float = 5.0  # seconds of the in-process baseline
    parts: tuple[str, ...] = ("monitor", "ingest", "local")
    profile: str = ""
    json: str = ""

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> Options:
        p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
        p.add_argument("--quick", action="store_true", help="about one minute: fewer steps, a shorter window")
        p.add_argument("--spin", action="store_true",
                       help="pace the training loop by spinning (holding the GIL, as a busy trainer does)")
        d = cls()
        for name in ("rate", "rounds", "steps", "layers", "ranks", "runs", "batch", "max_pending_steps",
                     "deep_every", "duration", "warmup", "local_duration"):
            p.add_argument("--" + name.replace("_", "-"), type=type(getattr(d, name)), default=None,
                           help=f"default {getattr(d, name)}")
        p.add_argument("--parts", default="monitor,ingest,local", help="which parts to run (default: all)")
        p.add_argument("--profile", default="", metavar="DIR", help="py-spy the service actor into DIR")
        p.add_argument("--json", default="", metavar="PATH", help="write every figure to PATH")
        a = p.parse_args(argv)
        opts = cls(quick=a.quick, spin=a.spin, profile=a.profile, json=a.json, parts=tuple(a.parts.split(",")))
        unknown = set(opts.parts) - {"monitor", "ingest", "local"}
        if unknown:
            p.error(f"unknown parts {sorted(unknown)}; choose from monitor, ingest, local")
        if a.quick:
            opts.rounds, opts.steps, opts.duration, opts.warmup, opts.local_duration = 2, 50, 8.0, 2.0, 3.0
        for name, value in vars(a).items():
            if value is not None and name not in ("quick", "spin", "profile", "json", "parts"):
                setattr(opts, name, value)
        return opts


# ---- small helpers ------------------------------------------------------------------------------
def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def proc_cpu_s(pid: int, tid: int | None = None) -> float | None:
    """CPU seconds (user + system) a process (or one of its threads) has used so far, or ``None``."""
    try:
        with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# ---- part 1: the training thread ----------------------------------------------------------------
def make_model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256),
                          nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


VARIANTS = ("service", "in_process", "none")


def monitor_round(variant: str, run: str, opts: Options) -> dict[str, Any]:
    """``opts.steps`` paced training steps; per-step times inside ``monitor.step`` and of the whole iteration.

    ``variant`` is ``service`` (the monitor finds the service), ``in_process`` (``service=None``) or ``none``
    (no monitor: the reference for the iteration time, which shows the cost of the sender thread too).
    """
    import torch
    import torch.nn.functional as F

    import gfservice

    model, opt = make_model()
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    mon = None
    if variant != "none":
        mon = gfservice.monitor(model, opt, run=run, service="auto" if variant == "service" else None)
        kind = type(mon.transport).__name__
        if variant == "service" and kind != "RaySender":
            raise SystemExit(f"monitor(service='auto') did not find the service (transport {kind})")
    times: dict[str, list[float]] = {"step_ms": [], "overhead_ms": [], "train_ms": [], "iter_ms": []}
    sender = getattr(getattr(mon, "transport", None), "_thread", None)  # RaySender's thread
    sender_cpu0 = proc_cpu_s(os.getpid(), sender.native_id) if sender else None
    cpu0 = time.process_time()
    period = 1.0 / opts.rate
    tick = time.perf_counter()
    for i in range(opts.steps):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        before = mon.overhead_s if mon else 0.0
        opt.step()
        t1 = time.perf_counter()
        if mon:
            mon.step(loss=loss)
        t2 = time.perf_counter()
        opt.zero_grad()
        t3 = time.perf_counter()
        if i >= opts.warmup_steps:
            times["train_ms"].append((t1 - t0) * 1e3)
            times["iter_ms"].append((t3 - t0) * 1e3)
            if mon:
                times["step_ms"].append((t2 - t1) * 1e3)
                times["overhead_ms"].append((mon.overhead_s - before) * 1e3)
        tick += period
        if opts.spin:  # a busy training thread: it holds the GIL between steps instead of sleeping
            while time.perf_counter() < tick:
                pass
        else:
            time.sleep(max(0.0, tick - time.perf_counter()))
    cpu = time.process_time() - cpu0
    sender_cpu = None if sender_cpu0 is None else proc_cpu_s(os.getpid(), sender.native_id) - sender_cpu0
    out: dict[str, Any] = {**times, "dropped": 0, "rejected": {}, "errors": 0,
                           "process_cpu_ms": [cpu * 1e3 / opts.steps] if not opts.spin else [],
                           "sender_cpu_ms": [] if sender_cpu is None else [sender_cpu * 1e3 / opts.steps]}
    if mon:
        mon.close()
        t = mon.transport
        out.update(transport=type(t).__name__, dropped=int(t.dropped), errors=mon.errors,
                   rejected=dict(t.rejected) if isinstance(t.rejected, dict) else {"rejected": int(t.rejected)},
                   layers=len(mon.collector.layers))
    return out


def summary(vals: list[float]) -> dict[str, float]:
    if not vals:
        return {"n": 0}
    return {"median_ms": percentile(vals, 50), "p99_ms": percentile(vals, 99), "max_ms": max(vals),
            "mean_ms": statistics.fmean(vals), "n": len(vals)}


def monitor_phase(handle, opts: Options) -> dict[str, Any]:
    import ray

    keys = ("step_ms", "overhead_ms", "train_ms", "iter_ms", "process_cpu_ms", "sender_cpu_ms")
    out: dict[str, Any] = {v: {**{k: [] for k in keys}, "dropped": 0, "rejected": {}, "errors": 0} for v in VARIANTS}
    runs = []
    load_before = load()
    for r in range(opts.rounds):
        order = VARIANTS[r % 3:] + VARIANTS[:r % 3]  # rotate, so that no variant always goes first
        for variant in order:
            run = f"bench-monitor-{variant}-{r}"
            res = monitor_round(variant, run, opts)
            agg = out[variant]
            for k in (*keys, "dropped", "errors"):
                agg[k] += res[k]
            for reason, n in res["rejected"].items():
                agg["rejected"][reason] = agg["rejected"].get(reason, 0) + n
            for k in ("transport", "layers"):
                if k in res:
                    agg[k] = res[k]
            if variant == "service":
                runs.append(run)
    # The service must hold every step of every round, and count no sender drops.
    rows = {r["run"]: r for r in ray.get(handle.runs.remote(), timeout=60)}
    svc = out["service"]
    svc["service_sender_dropped"] = sum(rows.get(run, {}).get("sender_dropped", 0) for run in runs)
    held = {run: {s.step for s in ray.get(handle.history.remote(run), timeout=60)} for run in runs if run in rows}
    from gfservice.service.aggregator import AggregatorConfig

    kept = min(opts.steps, AggregatorConfig().history)  # the service keeps this many merged steps per run
    svc["service_missing_steps"] = sum(kept - len(held.get(run, ())) for run in runs)
    for v in out.values():
        for k in keys:
            v[k.replace("_ms", "")] = summary(v.pop(k))
    out["load"] = {"before": load_before, "after": load()}
    return out


# ---- part 2: synthetic senders ------------------------------------------------------------------
def layer_names(n: int) -> list[str]:
    return [f"blocks.{i // 4}.{('attn.qkv', 'attn.proj', 'mlp.fc', 'mlp.out')[i % 4]}.weight" for i in range(n)]


def synthetic_messages(run: str, rank: int, world: int, n_layers: int, seed: int, variants: int = 8):
    """The layout dict and a pool of step-report dicts for one rank: healthy, steady gradients.

    Every dict is what ``RaySender.send`` ships: ``dict(model)`` of a validated pydantic model. Layer
    scales spread over one order of magnitude and move a few percent from step to step, so that the
    built-in detectors evaluate every step and raise nothing.
    """
    from gfservice.stats import EXP_BINS
    from gfservice.wire import Layout, StepReport

    names = layer_names(n_layers)
    layout = dict(Layout(run=run, rank=rank, world_size=world, layers=names, numel=[4096] * n_layers,
                         sharded=[True] * n_layers))
    rng = np.random.default_rng(seed)
    base = np.exp(np.linspace(np.log(1e-3), np.log(1e-2), n_layers))  # per-element RMS by layer
    count = np.full(n_layers, 4096 // world, np.int64)
    core, deep = [], []
    for _ in range(variants):
        rms = base * np.exp(rng.normal(0, 0.05, n_layers))
        sum_sq = rms**2 * count
        fields = dict(run=run, rank=rank, step=0, time=time.time(), count=count, sum_sq=sum_sq, max_abs=rms * 4,
                      nonfinite=np.zeros(n_layers, np.int64), loss=2.0, lr=1e-3,
                      local_norm=float(np.sqrt(sum_sq.sum())), step_time=0.1)
        core.append(dict(StepReport(**fields)))
        hist = np.zeros((n_layers, EXP_BINS), np.int64)
        hist[:, 115:120] = count[:, None] // 5
        deep.append(dict(StepReport(**fields, sum_abs=rms * 0.8 * count, zeros=np.zeros(n_layers, np.int64),
                                    exp_hist=hist, weight_norm=np.full(n_layers, 2.0),
                                    update_norm=np.full(n_layers, 2e-3))))
    return layout, core, deep


def message_for(core: list[dict], deep: list[dict], step: int, deep_every: int) -> dict:
    pool = deep if deep_every and step % deep_every == 0 else core
    msg = dict(pool[step % len(pool)])
    msg["step"] = step
    msg["time"] = time.time()
    return msg


class Sender:
    """The ranks of one synthetic run, as a Ray actor: each rank ships its own batches, as its RaySender would.

    Every round, each rank submits its next ``batch`` steps in its own call, and the round ends when all
    of them are answered: every rank has one call in flight and the ranks move in lock step, as the ranks
    of a real run do (a collective holds them together; nothing holds separate sender processes together).
    """

    def __init__(self, name: str, namespace: str, run: str, world: int, opts: dict, seed: int):
        import ray

        self.handle = ray.get_actor(name, namespace=namespace)
        self.run, self.world, self.opts = run, world, opts
        self.ranks = [synthetic_messages(run, rank, world, opts["layers"], seed=seed + rank) for rank in range(world)]
        self.step = self.calls = 0
        self.rejected: dict[str, int] = {}

    def _answers(self, refs) -> None:
        import ray

        for answer in ray.get(refs):
            for _i, reason in answer["rejected"]:
                self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def ready(self) -> bool:
        self._answers([self.handle.submit.remote([layout], None) for layout, _, _ in self.ranks])
        return True

    def _round(self, until_step: int | None) -> None:
        last = self.step + self.opts["batch"]
        if until_step is not None:
            last = min(last, until_step)
        deep_every = self.opts["deep_every"]
        refs = []
        for _layout, core, deep in self.ranks:
            batch = [message_for(core, deep, s, deep_every) for s in range(self.step, last)]
            refs.append(self.handle.submit.remote(batch, None))
        self.calls += len(refs)
        self.step = last
        self._answers(refs)

    def send_until(self, start_at: float, stop_at: float) -> int:
        """Send rounds from ``start_at`` to ``stop_at`` (wall clock); returns the next step."""
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < stop_at:
            self._round(None)
        return self.step

    def finish(self) -> dict[str, Any]:
        """End the run (every rank sends its ``RunEnd``, as ``Monitor.close`` does)."""
        self._answers([self.handle.submit.remote([{"run": self.run, "rank": r, "end": True}], None)
                       for r in range(self.world)])
        return {"run": self.run, "steps": self.step, "calls": self.calls, "rejected": self.rejected}


def ingest_phase(handle, name: str, namespace: str, opts: Options) -> dict[str, Any]:
    import ray

    status0 = ray.get(handle.status.remote(), timeout=60)
    pid = status0["pid"]
    actor = ray.remote(num_cpus=1, max_restarts=0)(Sender)
    task_opts = {"layers": opts.layers, "batch": opts.batch, "deep_every": opts.deep_every}
    senders = [actor.remote(name, namespace, f"bench-ingest-{k}", opts.ranks, task_opts, seed=100 * k)
               for k in range(opts.runs)]
    ray.get([s.ready.remote() for s in senders], timeout=300)
    start_at = time.time() + 0.5
    window_open = start_at + opts.warmup
    stop_at = window_open + opts.duration + 1.0
    refs = [s.send_until.remote(start_at, stop_at) for s in senders]
    time.sleep(max(0.0, window_open - time.time()))
    profiler = None
    if opts.profile:
        os.makedirs(opts.profile, exist_ok=True)
        profiler = subprocess.Popen(
            ["py-spy", "record", "-p", str(pid), "-d", str(int(opts.duration)), "-r", "100", "--nonblocking",
             "-f", "raw", "-o", os.path.join(opts.profile, "service.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    cpu0, t0a = proc_cpu_s(pid), time.time()
    c0 = ray.get(handle.status.remote(), timeout=60)["counters"]
    t0 = (t0a + time.time()) / 2
    load_window = load()
    time.sleep(max(0.0, window_open + opts.duration - time.time()))
    t1a = time.time()
    c1 = ray.get(handle.status.remote(), timeout=60)["counters"]
    t1 = (t1a + time.time()) / 2
    cpu1 = proc_cpu_s(pid)
    load_end = load()
    steps = ray.get(refs, timeout=opts.duration + 120)
    done = ray.get([s.finish.remote() for s in senders], timeout=300)
    c2 = ray.get(handle.status.remote(), timeout=60)
    for s in senders:
        ray.kill(s)
    if profiler is not None:
        _, err = profiler.communicate(timeout=opts.duration + 60)
        if profiler.returncode:
            print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
    merged = c1["layer_stats_merged"] - c0["layer_stats_merged"]
    wall = t1 - t0
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    runs = {r["run"]: r for r in c2["runs"] if r["run"].startswith("bench-ingest-")}
    finished = len(runs) == opts.runs and all(
        runs[d["run"]]["finished"] and runs[d["run"]]["last_step"] == d["steps"] - 1 for d in done)
    sender_rejected: dict[str, int] = {}
    for d in done:
        for reason, n in d["rejected"].items():
            sender_rejected[reason] = sender_rejected.get(reason, 0) + n
    return {
        "layer_stats_per_s": merged / wall,
        "layer_stats_per_cpu_s": None if not cpu else merged / cpu,
        "service_cpu_share": None if cpu is None else cpu / wall,
        "window_s": wall,
        "messages_per_s": (c1["accepted"] - c0["accepted"]) / wall,
        "steps_per_run": steps,
        "calls": sum(d["calls"] for d in done),
        "sender_rejected": sum(sender_rejected.values()),
        "service_rejected": {k: n - status0["counters"]["rejected"].get(k, 0)
                             for k, n in c2["counters"]["rejected"].items()
                             if n != status0["counters"]["rejected"].get(k, 0)},
        # every rank's report of every step merged exactly once:
        "layer_stats_total": c2["counters"]["layer_stats_merged"] - status0["counters"]["layer_stats_merged"],
        "layer_stats_expected": opts.layers * opts.ranks * sum(steps),
        "runs_finished": finished,
        "active_findings": sum(len(r["active"]) for r in runs.values()),
        "pid": pid,
        "load": {"window_start": load_window, "window_end": load_end},
    }


def local_phase(opts: Options) -> dict[str, Any]:
    """The bare ``Aggregator.submit`` loop on the same messages, ranks in lock step, no Ray."""
    from gfservice.service.actor import ServiceSettings
    from gfservice.service.aggregator import Aggregator

    settings = bench_settings("", opts)
    agg = Aggregator(settings.aggregator, settings.detectors)
    senders = []
    for k in range(opts.runs):
        run = f"bench-local-{k}"
        for rank in range(opts.ranks):
            layout, core, deep = synthetic_messages(run, rank, opts.ranks, opts.layers, seed=1000 * rank + k)
            assert agg.submit(layout).accepted
            senders.append((core, deep))
    assert isinstance(settings, ServiceSettings)
    step = 0
    t0, c0 = time.perf_counter(), time.thread_time()
    rejected = 0
    while time.perf_counter() - t0 < opts.local_duration:
        for s in range(step, step + opts.batch):
            for core, deep in senders:
                rejected += not agg.submit(message_for(core, deep, s, opts.deep_every)).accepted
        step += opts.batch
    wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
    merged = agg.layer_stats_merged
    return {"layer_stats_per_s": merged / wall, "layer_stats_per_cpu_s": merged / cpu, "steps": step,
            "rejected": rejected, "window_s": wall}


# ---- the service ----------------------------------------------------------------------------------
def bench_settings(snapshot_dir: str, opts: Options):
    from gfservice.service.actor import ServiceConfig, ServiceSettings
    from gfservice.service.aggregator import AggregatorConfig

    # max_pending_steps (default 16, as shipped) must be at least --batch: one rank's batch of more steps
    # than that makes the service merge steps without the other ranks and reject their reports as stale.
    return ServiceSettings(
        aggregator=AggregatorConfig(max_pending_steps=opts.max_pending_steps),
        service=ServiceConfig(
            metrics_port=None,
            snapshot_path=os.path.join(snapshot_dir, "snapshot.pkl") if snapshot_dir else "",
            sd_file="",
        ),
    )


# ---- report -------------------------------------------------------------------------------------
def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def table(res: dict[str, Any], opts: Options) -> str:
    tgt_ms, tgt_rate = TARGETS["monitor_median_ms"], TARGETS["ingest_layer_stats_per_s"]
    rows: list[tuple[str, str, str, str]] = []
    m = res.get("monitor")
    if m:
        svc, inp = m["service"], m["in_process"]
        drops = svc["dropped"] + svc["service_sender_dropped"]
        lost = sum(svc["rejected"].values()) + svc["errors"] + svc["service_missing_steps"]
        why = ", ".join(f"{k} {n}" for k, n in svc["rejected"].items())
        rows += [
            (f"**1. training thread** (MLP, {svc['layers']} layers, {opts.rate:g} steps/s, "
             f"{'spinning' if opts.spin else 'sleeping'} between steps, {svc['step']['n']} steps per variant)",
             "", "", ""),
            ("`monitor.step`, service attached: median", f"{svc['step']['median_ms']:.3f} ms", f"< {tgt_ms:g} ms",
             verdict(svc["step"]["median_ms"] < tgt_ms)),
            ("`monitor.step`, service attached: p99 / max",
             f"{svc['step']['p99_ms']:.3f} / {svc['step']['max_ms']:.3f} ms", "", ""),
            ("`Monitor.overhead_s` per step, service attached: median / p99",
             f"{svc['overhead']['median_ms']:.3f} / {svc['overhead']['p99_ms']:.3f} ms", "", ""),
            ("baseline `service=None` (in-process aggregator): median / p99",
             f"{inp['step']['median_ms']:.3f} / {inp['step']['p99_ms']:.3f} ms", "", ""),
            ("training step itself (fwd, bwd, AdamW): median", f"{svc['train']['median_ms']:.3f} ms", "", ""),
            ("whole iteration, median: no monitor / service / in-process",
             " / ".join(f"{m[v]['iter']['median_ms']:.3f}" for v in ("none", "service", "in_process")) + " ms",
             "", ""),
            ("process CPU per step (all threads): no monitor / service / in-process",
             "n/a (--spin)" if opts.spin else
             " / ".join(f"{m[v]['process_cpu']['mean_ms']:.3f}" for v in ("none", "service", "in_process")) + " ms",
             "", ""),
            ("  of it the RaySender thread (holds the GIL while it works)",
             f"{svc['sender_cpu'].get('mean_ms', float('nan')):.3f} ms", "", ""),
            ("reports dropped (sender + as the service counts them)", f"{drops}", "0", verdict(drops == 0)),
            ("rejected + monitor errors + steps the service lacks",
             f"{sum(svc['rejected'].values())} + {svc['errors']} + {svc['service_missing_steps']}"
             + (f" ({why})" if why else ""), "0", verdict(lost == 0)),
        ]
    ing, loc = res.get("ingest"), res.get("local")
    if ing:
        rej = sum(ing["service_rejected"].values())
        complete = ing["layer_stats_total"] == ing["layer_stats_expected"] and ing["runs_finished"]
        per_cpu = ing["layer_stats_per_cpu_s"]
        rows += [
            (f"**2. service ingest** ({opts.runs} run x {opts.ranks} ranks, {opts.layers} layers, {opts.batch} "
             f"steps/call, deep every {opts.deep_every}, {ing['window_s']:.0f} s)",
             "", "", ""),
            ("layer-statistics merged per second, via Ray", f"{ing['layer_stats_per_s'] / 1e6:.2f} M/s",
             f">= {tgt_rate / 1e6:g} M/s", verdict(ing["layer_stats_per_s"] >= tgt_rate)),
            ("  messages (rank-steps) per second", f"{ing['messages_per_s']:.0f} /s", "", ""),
            ("  per CPU second of the service process (its CPU share)",
             "n/a" if per_cpu is None else f"{per_cpu / 1e6:.2f} M/cpu-s ({ing['service_cpu_share']:.0%} of a core)",
             "", ""),
            ("rejected messages (service counters); every report merged, runs complete",
             f"{rej}; " + ("yes" if complete else f"NO ({ing['layer_stats_total']} of {ing['layer_stats_expected']})"),
             "0; yes", verdict(rej == 0 and ing["sender_rejected"] == 0 and complete)),
            ("active findings on the synthetic runs (healthy data)", f"{ing['active_findings']}", "0",
             verdict(ing["active_findings"] == 0)),
        ]
    if loc:
        rows.append(("baseline: bare in-process `Aggregator.submit` loop, same messages",
                     f"{loc['layer_stats_per_s'] / 1e6:.2f} M/s ({loc['layer_stats_per_cpu_s'] / 1e6:.2f} M/cpu-s)",
                     "", ""))
    if ing and loc:
        ratio = ing["layer_stats_per_s"] / loc["layer_stats_per_s"]
        cpu_ratio = (ing["layer_stats_per_cpu_s"] or float("nan")) / loc["layer_stats_per_cpu_s"]
        rows.append(("  via Ray / in-process (wall; per CPU second)", f"{ratio:.2f}; {cpu_ratio:.2f}", "", ""))
    seen = [("start", res["load"]["start"])]
    seen += [("monitor", m["load"]["after"])] if m else []
    seen += [("ingest window", ing["load"]["window_end"])] if ing else []
    seen += [("end", res["load"]["end"])]
    rows.append((f"load average (1 min) at {' / '.join(k for k, _ in seen)}",
                 " / ".join(f"{v[0]:.2f}" for _, v in seen), f"{os.cpu_count()} cores", ""))
    lines = ["| measure | value | target | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    opts = Options.parse(argv)
    import ray
    import torch

    torch.set_num_threads(1)
    res: dict[str, Any] = {"options": asdict(opts), "targets": TARGETS, "load": {"start": load()},
                           "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                       "torch": torch.__version__, "ray": ray.__version__}}
    tmp = tempfile.mkdtemp(prefix="gfb-")
    from gfservice.service import actor as svc

    def phase(name: str, fn, *args) -> None:
        t = time.time()
        res[name] = fn(*args)
        print(f"{name}: {time.time() - t:.1f} s; load {load()}", file=sys.stderr, flush=True)

    try:
        if {"monitor", "ingest"} & set(opts.parts):
            t = time.time()
            # A private cluster in a private temp dir: "auto" elsewhere on the machine will not find it.
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                     logging_level="ERROR", _temp_dir=os.path.join(tmp, "ray"))
            settings = bench_settings(tmp, opts)
            handle, _ = svc.start(settings)
            name, namespace = settings.service.name, settings.service.namespace
            print(f"ray and the service up in {time.time() - t:.1f} s; load {load()}", file=sys.stderr, flush=True)
            if "monitor" in opts.parts:
                phase("monitor", monitor_phase, handle, opts)
            if "ingest" in opts.parts:
                phase("ingest", ingest_phase, handle, name, namespace, opts)
            svc.stop(name, namespace)
            ray.shutdown()
        if "local" in opts.parts:
            phase("local", local_phase, opts)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    res["load"]["end"] = load()
    print(table(res, opts))
    if opts.json:
        with open(opts.json, "w") as fh:
            json.dump(res, fh, indent=2, default=float)
    ok = True
    if "monitor" in res:
        ok &= res["monitor"]["service"]["step"]["median_ms"] < TARGETS["monitor_median_ms"]
    if "ingest" in res:
        ok &= res["ingest"]["layer_stats_per_s"] >= TARGETS["ingest_layer_stats_per_s"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
