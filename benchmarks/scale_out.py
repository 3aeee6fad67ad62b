"""Scale-out: what the node merge agents and the aggregator cost per message, measured at what this machine holds,
and extrapolated to a 16,384-rank job (2,048 nodes x 8 ranks) of 1,000 tensors at 1 step/s.

What it simulates, and what it does not: ranks are *generated* shard messages (plain dicts, as ``RaySender``
ships them: a sharded run, healthy steady gradients, ``benchmarks/transport.py``'s ``rank_messages``), not training
processes; the parts below time each component on its own on this machine and add them up for the big job, which
assumes the agents run in parallel (one per node, each on its own node's CPU) and the aggregator is one actor.

1. **agent**: a :class:`~gfservice.hosting.merge_agent.NodeMerger` (the agent's work, no Ray) takes 8 ranks' reports
   of ``--layers`` layers per step and forwards one node message: CPU per rank-message, bytes in and out.
2. **aggregator**: an in-process :class:`~gfservice.service.aggregator.Aggregator` (built-in detectors on) takes
   ``--nodes`` node messages per step (a job of ``--nodes`` x 8 ranks): CPU per node-message, the
   run's accounted memory; merged statistics against a float64 reference (``math.fsum`` over every rank's shard);
   a NaN on one rank: the finding that names it, and the time from the NaN rank's message to it.
3. **ray**: a local Ray cluster, real :class:`~gfservice.hosting.merge_agent.MergeAgent` actors (one per simulated
   node, all on this one machine) and a real aggregator actor: steps of ``--ray-nodes`` x 8 ranks end to end, and
   the time from submitting a NaN rank's report to the finding that names it (polled through the service).
4. **ingest**: the per-step ingest of direct senders (no agent) at 256 / 1,024 / 4,096 ranks x 200 layers, batches
   of 32 as the Ray sender makes them, in-process; with ``--baseline PATH`` the same run against another checkout
   (e.g. the code before this change), in a child process, for before/after ratios from one run.

Run::

    .venv/bin/python benchmarks/scale_out.py                       # about two minutes on 2 cores
    .venv/bin/python benchmarks/scale_out.py --baseline ../main    # plus the before/after ingest curve
    .venv/bin/python benchmarks/scale_out.py --quick               # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import pickle
import statistics
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from transport import rank_messages

RUN = "scale-out"
LOCAL = 8  # ranks per node
BIG_RANKS, BIG_LAYERS = 16_384, 1_000


def node_ranks(node: int) -> list[int]:
    return list(range(node * LOCAL, (node + 1) * LOCAL))


def rank_pool(world: int, layers: int, node: int = 0) -> list[tuple[Any, Any, Any]]:
    """The layout, report maker and end of each rank of ``node`` (a sharded run of ``world`` ranks)."""
    return [rank_messages(RUN, r, world, layers, deep_every=0) for r in node_ranks(node)]


# ---- 1. the agent -------------------------------------------------------------------------------
def agent(layers: int, steps: int) -> tuple[list[str], dict[str, float]]:
    from gfservice.hosting.merge_agent import NodeMerger

    out: list[dict[str, Any]] = []
    merger = NodeMerger(out.extend, wait_s=60.0)
    pool = rank_pool(LOCAL * 256, layers)
    merger.submit([lay for lay, _, _ in pool])
    batches = [[report(s) for _, report, _ in pool] for s in range(steps)]
    bytes_in = statistics.mean(len(pickle.dumps(m)) for m in batches[0])
    out.clear()
    t0 = time.process_time()
    for batch in batches:
        for m in batch:  # one call per rank-message: the worst case (a sender batches several steps per call)
            merger.submit([m])
    cpu = (time.process_time() - t0) / (steps * LOCAL)
    bytes_out = statistics.mean(len(pickle.dumps(m)) for m in out)
    assert len(out) == steps and merger.merged_steps == steps, (len(out), merger.merged_steps)
    res = {"agent_cpu_ms": cpu * 1e3, "rank_bytes": bytes_in, "node_bytes": bytes_out}
    return [f"**1. agent**: {steps} steps x {LOCAL} ranks x {layers} layers, one call per rank-message", "",
            f"- CPU per rank-message: {cpu * 1e3:.3f} ms (target <= 1 ms)",
            f"- bytes per rank-message in: {bytes_in / 1e3:.1f} kB; per node-message out: {bytes_out / 1e3:.1f} kB "
            f"({LOCAL} ranks in one: {LOCAL * bytes_in / bytes_out:.1f}x fewer bytes to the aggregator)"], res


# ---- 2. the aggregator --------------------------------------------------------------------------
def node_messages(layers: int, nodes: int, steps: int, nan_rank: int | None = None) -> tuple[Any, list[list[Any]],
                                                                                               dict[str, float]]:
    """The node layouts and ``steps`` steps of node messages of a job of ``nodes`` nodes, as merge agents
    forward them (one real merge per step, its copies renamed for the other nodes), and the float64 reference sum
    of every rank's ``sum_sq`` per step and layer (``math.fsum``)."""
    from gfservice.hosting.merge_agent import NodeMerger

    out: list[dict[str, Any]] = []
    merger = NodeMerger(out.extend, wait_s=60.0)
    pool = rank_pool(nodes * LOCAL, layers)
    merger.submit([lay for lay, _, _ in pool])
    layout = out[-1]
    reports = [[report(s) for _, report, _ in pool] for s in range(steps)]
    out.clear()
    for batch in reports:
        merger.submit(batch)
    reference = {s: [math.fsum(float(m["stats"]["sum_sq"][i]) for m in reports[s]) * nodes for i in range(layers)]
                 for s in range(steps)}
    layouts = [{**layout, "rank": node * LOCAL, "ranks": node_ranks(node), "world_size": nodes * LOCAL}
               for node in range(nodes)]
    per_step = []
    for s, merged in enumerate(out):
        msgs = []
        for node in range(nodes):
            ranks = node_ranks(node)
            part = dict(merged["node"])
            part["ranks"] = ranks
            for k in ("local_norm", "step_time", "compute_time"):
                if part.get(k):
                    part[k] = {"ranks": ranks[:len(part[k]["ranks"])], "values": part[k]["values"]}
            m = {**merged, "rank": ranks[0], "node": part}
            if nan_rank is not None and s == steps - 1 and nan_rank in ranks:
                stats = dict(m["stats"])
                stats["sum_sq"] = stats["sum_sq"].copy()
                stats["nonfinite"] = stats["nonfinite"].copy()
                stats["sum_sq"][3], stats["nonfinite"][3] = np.nan, 1
                stats["max_abs"] = stats["max_abs"].copy()
                stats["max_abs"][3] = np.nan
                m = {**m, "stats": stats, "local_nonfinite": True, "node": {**part, "nonfinite": [nan_rank]}}
            msgs.append(m)
        per_step.append(msgs)
    return layouts, per_step, reference


def aggregator(layers: int, nodes: int, steps: int) -> tuple[list[str], dict[str, float]]:
    from gfservice.config import Settings
    from gfservice.service.aggregator import Aggregator
    from gfservice.service.ingest import take

    nan_rank = nodes * LOCAL - 3  # on the last node
    layouts, per_step, reference = node_messages(layers, nodes, steps, nan_rank)
    settings = Settings()
    agg = Aggregator(settings.aggregator, settings.detectors)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    answer, _ = take(agg, layouts)
    assert not answer.rejected, answer.rejected
    times = []
    nan_s = float("nan")
    rejected = 0
    for s, msgs in enumerate(per_step):
        t0 = time.process_time()
        w0 = time.perf_counter()
        for i in range(0, len(msgs), 32):
            answer, _ = take(agg, msgs[i:i + 32])
            rejected += len(answer.rejected)
        if s == steps - 1:
            nan_s = time.perf_counter() - w0  # the NaN node's message is the last one of the step
        times.append(time.process_time() - t0)
    traced = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    view = agg.run_view(RUN)
    history = agg.history(RUN)
    err = max(abs(float(h.grads.sum_sq[i]) - reference[h.step][i]) / reference[h.step][i]
              for h in history[:-1] for i in range(layers))
    named = [f for f in agg.findings(RUN) if f.detector == "nonfinite"]
    per_node = statistics.median(times[1:-1] if steps > 3 else times) / nodes
    last = history[-1]
    res = {"agg_cpu_ms_per_node_msg": per_node * 1e3, "memory_bytes": view.memory_bytes, "traced_peak": traced,
           "rel_err": err, "nan_to_finding_s": nan_s, "nodes": nodes}
    return [f"**2. aggregator**: {nodes} node-messages per step (a job of {nodes * LOCAL} ranks) x "
            f"{layers} layers, {steps} steps, built-in detectors on", "",
            f"- CPU per node-message: {per_node * 1e3:.3f} ms (median step {per_node * nodes * 1e3:.0f} ms); "
            f"rejected {rejected}",
            f"- merged step: {len(last.rank_ids)} ranks in its rank arrays, {len(last.missing_ranks)} missing",
            f"- memory: run accounted {view.memory_bytes / 2**20:.1f} MiB, traced peak {traced / 2**20:.1f} MiB",
            f"- merged sum_sq against a float64 reference (fsum over every rank): max relative error {err:.1e} "
            "(target <= 1e-9)",
            f"- NaN on rank {nan_rank}: finding names ranks {named[0].ranks if named else None}; "
            f"{nan_s:.3f} s from the step's first node message to the finding (in-process)"], res


# ---- 3. under Ray -------------------------------------------------------------------------------
def under_ray(layers: int, nodes: int, steps: int) -> tuple[list[str], dict[str, float]]:
    import ray

    from gfservice.config import AggregatorConfig, ServiceConfig, Settings
    from gfservice.hosting import actor as svc
    from gfservice.hosting.merge_agent import MergeAgent

    own = not ray.is_initialized()
    if own:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                 namespace="gfservice-scale-out")
    settings = Settings(aggregator=AggregatorConfig(merge_timeout_s=5.0),
                        service=ServiceConfig(name="gf-scale-out", snapshot_path="", metrics_port=None))
    handle, _ = svc.start(settings)
    try:
        agents = [ray.remote(MergeAgent).options(num_cpus=0, max_concurrency=4).remote(handle, None, 1.0)
                  for _ in range(nodes)]
        world = nodes * LOCAL
        pools = [[rank_messages(RUN, r, world, layers, deep_every=0) for r in node_ranks(n)] for n in range(nodes)]
        ray.get([a.submit.remote([lay for lay, _, _ in pool]) for a, pool in zip(agents, pools, strict=True)])
        nan_rank = world - 3
        t_start = time.perf_counter()
        t_nan = 0.0
        for s in range(steps):
            calls = []
            for a, pool in zip(agents, pools, strict=True):
                msgs = [report(s) for _, report, _ in pool]
                if s == steps - 1:
                    for i, m in enumerate(msgs):
                        if m["rank"] == nan_rank:
                            stats = {**m["stats"], "sum_sq": m["stats"]["sum_sq"].copy(),
                                     "nonfinite": m["stats"]["nonfinite"].copy()}
                            stats["sum_sq"][3], stats["nonfinite"][3] = np.nan, 1
                            msgs[i] = {**m, "stats": stats, "local_nonfinite": True}
                    t_nan = time.perf_counter()
                calls.append(a.submit.remote(msgs))
            ray.get(calls)
        found: list[Any] = []
        while time.perf_counter() - t_nan < 30 and not found:
            found = [f for f in ray.get(handle.findings.remote(RUN, 0)) if f.detector == "nonfinite"]
            if not found:
                time.sleep(0.02)
        latency = time.perf_counter() - t_nan
        total = time.perf_counter() - t_start
        latest = ray.get(handle.latest.remote(RUN))
        stats = ray.get([a.stats.remote() for a in agents])
        res = {"ray_nan_to_finding_s": latency, "ray_step_s": total / steps}
        return [f"**3. under Ray**: {nodes} merge agents x {LOCAL} ranks x {layers} layers, a real aggregator actor, "
                f"{steps} steps (all on this machine)", "",
                f"- {total / steps * 1e3:.0f} ms per step end to end (driver-generated messages, agents and "
                "aggregator sharing 2 cores)",
                f"- newest merged step {latest.step if latest else None}, {len(latest.rank_ids) if latest else 0} "
                f"ranks in it; agents took {sum(x['taken'] for x in stats)} messages, forwarded "
                f"{sum(x['merged_steps'] for x in stats)} node steps",
                f"- NaN on rank {nan_rank}: named {found[0].ranks if found else None} "
                f"{latency:.2f} s after its report was submitted (target <= 2 s)"], res
    finally:
        svc.stop(settings.service.name, settings.service.namespace)
        if own:
            ray.shutdown()


# ---- 4. the ingest curve of direct senders ------------------------------------------------------
def ingest_curve(sizes: list[int], layers: int = 200, steps: int = 3) -> dict[int, float]:
    """Median seconds per step of in-process ingest of ``size`` direct ranks (batches of 32)."""
    from gfservice.config import Settings
    from gfservice.service.aggregator import Aggregator
    from gfservice.service.ingest import take

    out = {}
    for ranks in sizes:
        s = Settings()
        agg = Aggregator(s.aggregator, s.detectors)
        msgs = [rank_messages("curve", r, ranks, layers, deep_every=0) for r in range(ranks)]
        for lay, _, _ in msgs:
            agg.submit(lay)
        times = []
        for step in range(steps):
            batch = [rep(step) for _, rep, _ in msgs]
            t0 = time.process_time()
            for i in range(0, ranks, 32):
                take(agg, batch[i:i + 32])
            times.append(time.process_time() - t0)
        out[ranks] = statistics.median(times)
    return out


def curve_lines(sizes: list[int], baseline: str | None) -> list[str]:
    after = ingest_curve(sizes)
    before: dict[int, float] = {}
    if baseline:
        here = os.path.dirname(os.path.abspath(__file__))
        code = (f"import sys; sys.path[:0] = [{baseline!r}, {here!r}]; import scale_out; "
                f"print(scale_out.ingest_curve({sizes!r}))")
        env = {**os.environ, "PYTHONPATH": f"{baseline}:{os.path.join(baseline, '.pypath')}"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                              cwd=baseline)
        before = {int(k): v for k, v in eval(done.stdout.strip().splitlines()[-1]).items()}
    lines = ["**4. ingest of direct senders** (no agent), 200 layers, batches of 32, CPU s per step "
             "(median of 3)", "", "| ranks | before | after | after/before |", "|---|---|---|---|"]
    for n in sizes:
        b = before.get(n)
        lines.append(f"| {n} | {f'{b:.3f}' if b else '-'} | {after[n]:.3f} | "
                     f"{f'{after[n] / b:.2f}' if b else '-'} |")
    return lines


def extrapolate(a: dict[str, float], g: dict[str, float], layers: int) -> list[str]:
    nodes = BIG_RANKS // LOCAL
    scale = BIG_LAYERS / layers
    agg_s = g["agg_cpu_ms_per_node_msg"] * 1e-3 * nodes * scale
    mem = g["memory_bytes"] / g["nodes"] * nodes * scale  # per-node parts (pending, rank arrays) scale with nodes
    wire = a["node_bytes"] * nodes * scale
    return [f"**Extrapolation to {BIG_RANKS} ranks ({nodes} nodes x {LOCAL}) x {BIG_LAYERS} tensors at 1 step/s**",
            "",
            f"- agent: {a['agent_cpu_ms'] * scale:.2f} ms CPU per rank-message, "
            f"{LOCAL * a['agent_cpu_ms'] * scale:.1f} ms per node per step (on the node's own CPU, in parallel "
            "across nodes; Ray's own deserialization of the call not counted)",
            f"- aggregator: {agg_s:.2f} s CPU per step ({nodes} node-messages x "
            f"{g['agg_cpu_ms_per_node_msg'] * scale:.3f} ms; target <= 0.5 s)",
            f"- aggregator memory for the run: about {mem / 2**20:.0f} MiB as accounted (an upper bound: the run's "
            "history and detector state do not grow with nodes; target <= 2 GiB)",
            f"- bytes to the aggregator: {wire / 2**20:.0f} MiB per step ({nodes} node-messages of "
            f"{a['node_bytes'] * scale / 1e3:.0f} kB), against {BIG_RANKS * a['rank_bytes'] * scale / 2**20:.0f} "
            "MiB without agents",
            "- assumptions: costs linear in layers (measured at "
            f"{layers}); one node-message per node per step; core steps (deep steps, every 50th by default, carry "
            "a 256-bin histogram per layer and cost more); agents on every node in parallel; no other run on the "
            "aggregator; this machine's 2 shared cores (a server core is faster)"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--layers", type=int, default=BIG_LAYERS)
    ap.add_argument("--nodes", type=int, default=None, help="2. node-messages per step (default 256, quick 16)")
    ap.add_argument("--steps", type=int, default=None, help="steps (default 5, quick 3)")
    ap.add_argument("--ray-nodes", type=int, default=None, help="3. merge agents (default 4, quick 2)")
    ap.add_argument("--baseline", default=None, help="4. another checkout to run the ingest curve against")
    ap.add_argument("--part", choices=("all", "agent", "aggregator", "ray", "ingest"), default="all")
    args = ap.parse_args(argv)
    logging.getLogger("gfservice").setLevel(logging.ERROR)
    q = args.quick
    layers = args.layers if not q else min(args.layers, 200)
    steps = args.steps or (3 if q else 5)
    print(f"# gfservice scale-out: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    a = g = None
    if args.part in ("all", "agent"):
        lines, a = agent(layers, steps * 4)
        print("\n".join(lines) + "\n")
    if args.part in ("all", "aggregator"):
        lines, g = aggregator(layers, args.nodes or (16 if q else 256), steps)
        print("\n".join(lines) + "\n")
    if a and g:
        print("\n".join(extrapolate(a, g, layers)) + "\n")
    if args.part in ("all", "ray"):
        lines, _ = under_ray(layers, args.ray_nodes or (2 if q else 4), steps)
        print("\n".join(lines) + "\n")
    if args.part in ("all", "ingest"):
        print("\n".join(curve_lines([64, 256] if q else [256, 1024, 4096], args.baseline)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
