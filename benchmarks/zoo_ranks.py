"""The multi-rank zoo: real DDP runs (gloo backend, CPU processes) with a fault on one rank, scored like
``benchmarks/detection.py``.

```bash
.venv/bin/python benchmarks/zoo_ranks.py                      # every scenario, 3 seeds: about 5 minutes on 2 cores
.venv/bin/python benchmarks/zoo_ranks.py --only ddp4,straggler --seeds 1 --json out.json
.venv/bin/python benchmarks/zoo_ranks.py --list
```

Each run spawns ``world`` processes (``torch.multiprocessing``, one thread each) that train the zoo's 64-128-128-10
ReLU MLP on digits under ``DistributedDataParallel``, each rank on its own random batches. Every rank runs a real
:class:`gfservice.training.monitoring.Monitor` set up as ``gfservice.monitor`` sets up DDP ranks (rank 0 reports
the layers, every rank its pre-allreduce local norm and timings through a
:class:`~gfservice.training.ddp_hook.LocalNormHook`); a small :class:`QueueTransport` puts their messages on one
multiprocessing queue that feeds ONE :class:`~gfservice.service.aggregator.Aggregator` in this process, with every
installed detector at its defaults (as ``gfservice.monitor(..., service=None)`` would run them). Faults, on one rank
from step ``onset`` on:

- ``labels``: the rank's labels are shuffled within each batch (a corrupted data shard);
- ``inputs``: the rank's inputs are scaled 10x (a shard with the wrong normalisation);
- ``sleep``: the rank sleeps ``sleep_s`` in its data loading, before the forward (a slow host or data pipeline).

Scoring and the report reuse ``detection.py``: a warning/critical finding on a healthy run is a FALSE-ALARM; on a
pathological run the expected detector must raise one within 50 steps of the onset, and here it must also name
the faulty rank and no other (column ``named ranks``). The ``noise_scale`` detector runs with the run's batch sizes
(an info finding when the global batch is over 10x the noise scale); the ``B_noise`` column is the noise scale in
samples over the last half of the run (EMA of both terms of :func:`gfservice.stats.noise_scale`; ``-`` where the
estimate of ``|G|^2`` is not positive: a run that has converged), for reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

if __package__:  # imported as benchmarks.zoo_ranks
    from . import detection, zoo
else:  # run as a script: benchmarks/ is on sys.path
    import detection  # type: ignore[no-redef]
    import zoo  # type: ignore[no-redef]

from gfservice.api import Finding, StepStats
from gfservice.service.aggregator import Aggregator
from gfservice.stats import noise_scale
from gfservice.training.transport import TransportBase
from gfservice.wire import Layout, RunEnd, StepReport

Fault = Literal["labels", "inputs", "sleep"]


@dataclass(frozen=True)
class RankScenario:
    """A multi-rank run: ``world`` DDP ranks, ``steps`` steps, optionally a fault on ``fault_rank`` from ``onset``.

    Has the attributes :func:`detection.score` reads (``name``, ``kind``, ``onset``, ``expected``, ``layers``,
    ``forbid``).
    """

    name: str
    kind: Literal["healthy", "pathological"]
    world: int
    steps: int
    description: str
    fault: Fault | None = None
    fault_rank: int | None = None
    onset: int | None = None
    expected: str | None = None
    sleep_s: float = 0.15
    batch: int = 32
    lr: float = 0.05
    layers: None = None
    forbid: tuple[str, ...] = ()
    #: Detector field overrides for this run (a detector that is not installed is skipped).
    detectors: dict[str, dict[str, Any]] = field(default_factory=dict)
    quick: bool = False


K = 100  # onset of the data faults
SCENARIOS: list[RankScenario] = [
    RankScenario("ddp3", "healthy", 3, 300, "3 ranks, MLP on digits, SGD momentum, 32 samples per rank", quick=True),
    RankScenario("ddp4", "healthy", 4, 300, "4 ranks, MLP on digits, SGD momentum, 32 samples per rank"),
    RankScenario("ddp4_b8", "healthy", 4, 300, "4 ranks, 8 samples per rank (noisy local norms), SGD lr 0.02",
                 batch=8, lr=0.02),
    RankScenario("shard_labels", "pathological", 4, K + 60, "4 ranks; rank 2's labels shuffled from step k",
                 fault="labels", fault_rank=2, onset=K, expected="rank_divergence", quick=True),
    RankScenario("shard_inputs", "pathological", 3, K + 60, "3 ranks; rank 1's inputs scaled 10x from step k",
                 fault="inputs", fault_rank=1, onset=K, expected="rank_divergence"),
    RankScenario("straggler", "pathological", 4, 120, "4 ranks; rank 3 sleeps 0.15 s per step before its "
                 "forward from step 60 (step times stay equal: the others wait in the all-reduce)",
                 fault="sleep", fault_rank=3, onset=60, expected="straggler", quick=True),
    RankScenario("straggler3", "pathological", 3, 120, "3 ranks; rank 0 (the one reporting layers) sleeps 0.1 s "
                 "per step from step 60", fault="sleep", fault_rank=0, onset=60, expected="straggler",
                 sleep_s=0.1),
]
BY_NAME = {sc.name: sc for sc in SCENARIOS}


class QueueTransport(TransportBase):
    """A monitor's transport that puts every message on a multiprocessing queue read by one aggregator."""

    def __init__(self, q: Any) -> None:
        self.q = q
        self.dropped = 0

    def send(self, message: Layout | StepReport | RunEnd) -> None:
        self.q.put(message)

    def findings(self, run: str) -> list[Finding]:
        return []

    def stop_reason(self, run: str) -> str | None:
        return None

    def latest(self, run: str) -> StepStats | None:
        return None

    def close(self) -> None:
        pass


def worker(rank: int, sc: RankScenario, seed: int, run: str, data: tuple[np.ndarray, np.ndarray], q: Any,
           store: str, deep_every: int) -> None:
    """One DDP rank: train ``sc`` with a monitor whose messages go to ``q``."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gfservice.training.ddp_hook import LocalNormHook
    from gfservice.training.monitoring import Monitor, MonitorOptions

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=sc.world)
    torch.manual_seed(seed)
    model = DDP(zoo.mlp(64, 128, 128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=sc.lr, momentum=0.9)
    batches = zoo.sample(torch.from_numpy(data[0]), torch.from_numpy(data[1]), sc.batch, seed * 1000 + rank)
    gen = torch.Generator().manual_seed(seed * 1000 + 500 + rank)
    options = MonitorOptions(run=run, deep_every=deep_every, rank=rank, world_size=sc.world, reports_layers=rank == 0)
    mon = Monitor(model, opt, QueueTransport(q), options, local_norm_hook=LocalNormHook.install(model))
    faulty = sc.fault is not None and rank == sc.fault_rank and sc.onset is not None
    for i in range(sc.steps):
        x, y = next(batches)
        if faulty and sc.onset is not None and i >= sc.onset:
            if sc.fault == "sleep":
                time.sleep(sc.sleep_s)
            elif sc.fault == "labels":
                y = y[torch.randperm(len(y), generator=gen)]
            elif sc.fault == "inputs":
                x = x * 10.0
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        mon.step(loss=loss.detach())
        opt.zero_grad(set_to_none=True)
    mon.close()
    # Exit without destroy_process_group() (a rank that fails is killed by the parent): with a Python DDP
    # communication hook (the monitor's LocalNormHook chains DDP's allreduce_hook, whose future has a Python
    # callback), ProcessGroupGloo's destructor can deadlock: it joins gloo's run-loop thread while holding the GIL,
    # and that thread waits for the GIL to release the callback (seen in 1 of 20 runs). Flush this rank's
    # messages, then leave at once.
    q.close()
    q.join_thread()
    os._exit(0)


def run_ranks(sc: RankScenario, seed: int, run: str, deep_every: int = 10,
              settings: dict[str, dict[str, Any]] | None = None, timeout_s: float = 600.0) -> Aggregator:
    """Train ``sc`` on ``sc.world`` ranks feeding one aggregator (built with ``settings``); returns it.

    The ranks are forked from a ``forkserver`` that has imported this module (torch, gfservice) once: spawning
    each rank afresh would import torch in every one of them, which takes most of a run's time on a busy machine.
    """
    ctx = mp.get_context("forkserver")
    # Read when the server starts (the first run of this process). The server does not get this process' sys.path:
    # a module outside the installed packages (this one, unless run as a script) is imported by the ranks.
    # torch._dynamo: DistributedDataParallel imports it on first use (about 800 modules, seconds).
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.nn.parallel", "torch._dynamo",
                                "gfservice.training.monitoring", worker.__module__])
    q = ctx.Queue()
    agg = Aggregator(detector_settings=settings)
    x, y = zoo.digits()
    data = (x.numpy(), y.numpy())
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = mp.start_processes(worker, args=(sc, seed, run, data, q, store, deep_every), nprocs=sc.world,
                                   join=False, start_method="forkserver")
        ended, deadline = 0, time.monotonic() + timeout_s
        try:
            while ended < sc.world:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{run}: the ranks did not finish in {timeout_s:.0f} s")
                try:
                    msg = q.get(timeout=0.5)
                except queue.Empty:
                    procs.join(timeout=0)  # raises if a rank failed
                    continue
                ack = agg.submit(msg)
                if not ack.accepted:
                    print(f"{run}: the aggregator rejected a message: {ack.reason}", file=sys.stderr)
                ended += isinstance(msg, RunEnd)
            while not procs.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{run}: the ranks did not exit in {timeout_s:.0f} s")
        finally:
            for p in procs.processes:
                if p.is_alive():
                    p.kill()
            q.close()
    agg.flush()
    return agg


def noise_scale_samples(history: Sequence[StepStats], batch: int, alpha: float = 0.05) -> float:
    """The noise scale in samples from EMAs of both terms over ``history`` (the paper's recipe)."""
    g_ema = t_ema = None
    for st in history:
        if st.rank_norm is None:
            continue
        _, g2, tr = noise_scale(np.asarray(st.rank_norm) ** 2, st.global_norm**2, batch)
        if not (math.isfinite(g2) and math.isfinite(tr)):
            continue
        g_ema = g2 if g_ema is None else (1 - alpha) * g_ema + alpha * g2
        t_ema = tr if t_ema is None else (1 - alpha) * t_ema + alpha * tr
    if g_ema is None or t_ema is None or g_ema <= 0:
        return float("nan")
    return t_ema / g_ema


@dataclass
class RankResult:
    """A :class:`detection.Result` plus what only multi-rank runs have."""

    result: detection.Result
    world: int
    fault_rank: int | None
    named_ranks: list[int]
    ranks_ok: bool | None
    b_noise: float
    history: list[dict[str, Any]] = field(default_factory=list)


def train(sc: RankScenario, seed: int, deep_every: int, keep_history: bool = False) -> RankResult:
    """Run one scenario with one seed and score it as ``detection.py`` does, plus the named ranks."""
    t0 = time.perf_counter()
    run = f"{sc.name}-s{seed}"
    # The noise scale is judged against the run's real batch sizes (an info finding at most: never an alarm).
    overrides = {"noise_scale": {"per_rank_batch": sc.batch, "global_batch": sc.batch * sc.world}, **sc.detectors}
    settings = {det: dict(fields) for det, fields in overrides.items() if detection.installed(det)}
    agg = run_ranks(sc, seed, run, deep_every, settings)
    findings = agg.findings(run)
    history = agg.history(run)
    res = detection.Result(sc.name, seed, sc.kind, sc.steps, sc.onset, sc.expected,
                           detection.installed(sc.expected) if sc.expected else None)
    losses = [float(st.loss) for st in history if st.loss is not None]
    if losses:
        res.loss_first = detection._num(losses[0])
        res.loss_last = detection._num(sum(losses[-10:]) / len(losses[-10:]))
    alarms = sorted((f for f in findings if f.severity.value != "info"), key=detection._first)
    for f in sorted(findings, key=detection._first):
        (res.infos if f.severity.value == "info" else res.alarms).setdefault(f.detector, detection._first(f))
    detection.score(res, sc, alarms, [], deep_every)  # type: ignore[arg-type]
    named: list[int] = []
    ranks_ok = None
    if sc.expected is not None and res.deadline is not None and sc.onset is not None:
        mine = [f for f in alarms if f.detector == sc.expected and sc.onset <= detection._first(f) <= res.deadline]
        named = sorted({r for f in mine for r in f.ranks})
        if mine:
            ranks_ok = named == [sc.fault_rank]
            if not ranks_ok:
                res.verdict = "MISS"
                res.why = "; ".join(filter(None, [res.why, f"named ranks {named}, expected [{sc.fault_rank}]"]))
    res.wall_s = round(time.perf_counter() - t0, 2)
    half = history[len(history) // 2:]
    hist = []
    if keep_history:
        for st in history:
            hist.append({"step": st.step, "norm": st.global_norm,
                         "rank_norm": None if st.rank_norm is None else st.rank_norm.tolist(),
                         "compute_time": None if st.compute_time is None else st.compute_time.tolist(),
                         "step_time": None if st.step_time is None else st.step_time.tolist()})
    return RankResult(res, sc.world, sc.fault_rank, named, ranks_ok, noise_scale_samples(half, sc.batch), hist)


# ---- reporting -----------------------------------------------------------------------------------------------
def table(results: list[RankResult]) -> str:
    head = ["scenario", "seed", "ranks", "kind", "onset", "expected", "alarms (first step)", "info", "delay",
            "named ranks", "B_noise", "loss", "wall s", "verdict", "note"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rr in results:
        r = rr.result
        expected = "-" if r.expected is None else r.expected + ("" if r.installed else " (n/i)")
        named = "-" if rr.ranks_ok is None else (",".join(map(str, rr.named_ranks))
                                                 + (" ok" if rr.ranks_ok else f" WRONG (rank {rr.fault_rank})"))
        cells = [r.scenario, str(r.seed), str(rr.world), r.kind[:4], "-" if r.onset is None else str(r.onset),
                 expected, detection._steps(r.alarms), detection._steps(r.infos),
                 "-" if r.delay is None else f"+{r.delay}", named,
                 "-" if not math.isfinite(rr.b_noise) else f"{rr.b_noise:.0f}",
                 f"{detection._g(r.loss_first)} -> {detection._g(r.loss_last)}", f"{r.wall_s:.0f}",
                 f"**{r.verdict}**" if r.verdict != "PASS" else r.verdict, r.why]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report(results: list[RankResult], s: dict[str, Any]) -> str:
    plain = [rr.result for rr in results]
    out = ["## Multi-rank runs (DDP, gloo, CPU)", "", table(results), "",
           "ranks: DDP ranks; alarms: warning/critical findings as detector@first step; info: info findings (not "
           "alarms); delay: steps from the onset to the expected detector's first alarm; named ranks: the ranks its "
           "alarms named in time; B_noise: gradient noise scale in samples over the last half of the run (EMA); "
           "loss: at step 0 -> mean of the last 10 steps.", ""]
    for title, attr in (("False alarms on healthy runs", "false_alarms"),
                        ("Unexpected extra alarms on pathological runs (after the onset)", "extras"),
                        ("Alarms before the onset on pathological runs", "pre_onset")):
        out += [f"## {title}", "", *(detection.grouped(plain, attr) or ["none"]), ""]
    fa = s["false_alarms_per_10k_steps"]
    out += [
        "## Summary", "",
        f"- detection rate on pathological runs: {s['detected']}/{s['pathological_runs']}; per scenario: "
        f"{', '.join(f'{k} {v}' for k, v in s['per_scenario'].items())}",
        f"- expected detectors not installed: {', '.join(s['not_installed']) or 'none'}",
        f"- false alarms: {s['false_alarms']} in {s['healthy_steps']} healthy steps = "
        f"{'-' if fa is None else f'{fa:.1f}'} per 10,000 steps; by detector: "
        f"{s['false_alarms_by_detector'] or 'none'}",
        f"- alarms before the onset on pathological runs: {s['pre_onset_alarms']} in {s['pre_onset_steps']} steps",
        f"- wall time: {s['wall_s']} s",
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="one seed of a healthy, a diverging and a straggling run")
    ap.add_argument("--only", help="comma-separated scenario names")
    ap.add_argument("--seeds", type=int, help="seeds per scenario (default 3; 1 with --quick)")
    ap.add_argument("--deep-every", type=int, default=10, help="deep statistics every N steps (default 10)")
    ap.add_argument("--json", help="write the raw results and the summary to this file")
    ap.add_argument("--history", action="store_true", help="with --json: also each run's per-rank norms and times")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.list:
        for sc in SCENARIOS:
            exp = f"onset {sc.onset}, expects {sc.expected}" if sc.expected else "no alarm expected"
            print(f"{sc.name:14} {sc.kind:12} {sc.world} ranks {sc.steps:4} steps  {exp}: {sc.description}")
        return 0
    if args.only:
        unknown = [n for n in args.only.split(",") if n not in BY_NAME]
        if unknown:
            ap.error(f"unknown scenario {', '.join(unknown)}; --list shows them")
        chosen = [BY_NAME[n] for n in args.only.split(",")]
    else:
        chosen = [sc for sc in SCENARIOS if sc.quick or not args.quick]
    seeds = args.seeds or (1 if args.quick else 3)
    zoo.digits()
    detection.installed("nonfinite")
    t0, c0 = time.perf_counter(), time.process_time()
    results: list[RankResult] = []
    total = len(chosen) * seeds
    for sc in chosen:
        for seed in range(seeds):
            rr = train(sc, seed, args.deep_every, keep_history=args.history)
            results.append(rr)
            r = rr.result
            print(f"[{len(results)}/{total}] {sc.name} seed {seed}: {r.verdict} {r.why} ({r.wall_s:.1f} s)",
                  file=sys.stderr, flush=True)
    s = detection.summary([rr.result for rr in results], time.perf_counter() - t0, time.process_time() - c0)
    print(report(results, s))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"summary": s, "args": vars(args),
                       "results": [{**asdict(rr.result), "world": rr.world, "fault_rank": rr.fault_rank,
                                    "named_ranks": rr.named_ranks, "ranks_ok": rr.ranks_ok,
                                    "b_noise": rr.b_noise if math.isfinite(rr.b_noise) else None,
                                    "history": rr.history} for rr in results]}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
