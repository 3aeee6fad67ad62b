"""``gfservice demo``: the main job on the embedded default. A local Ray, the service, and a real Ray Train
``TorchTrainer`` run (N CPU workers, gloo, DDP) with an injected fault; progress and findings are shown as
they arrive, and a summary table closes the run.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run a real Ray Train job on a local Ray with the service watching it",
        description="Start a local Ray and the gfservice service, train a small MLP on scikit-learn's digits "
        "with a Ray Train TorchTrainer (gloo, CPU) while injecting a fault, and show what the detectors find.",
    )
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--steps", type=int, default=120, help="training steps per worker (default 120)")
    p.add_argument("--fault", default="explode@60",
                   help="none | explode@STEP | nan@STEP | vanish (default explode@60: the learning rate jumps "
                   "x1000 at step 60)")
    p.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp", help="DDP or FSDP2 (default ddp)")
    p.add_argument("--run", default=None, help="run name (default demo-<fault>-<time>)")
    p.add_argument("--metrics-port", type=int, default=None, help="serve /metrics on this port (0: any free port)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address of /metrics (default 127.0.0.1)")
    p.add_argument("--config", default=None, help="TOML/YAML configuration file (detectors, aggregator, service)")
    p.add_argument("--report", default=None, help="write a gradient-flow report (.png or .html) at the end")
    p.add_argument("--save-history", default=None, metavar="FILE",
                   help="save the run's history (merged steps and findings, .npz) at the end: `gfservice backtest` "
                   "and `gfservice report --history` read it")
    p.add_argument("--step-delay", type=float, default=0.0, help="seconds to sleep per step (default 0)")
    p.add_argument("--keep-serving", action="store_true",
                   help="after the run, keep Ray and the service up (Ctrl-C to stop)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from gfservice.cli.workload import WorkloadConfig
    from gfservice.hosting import actor as svc
    from gfservice.service.client import Client
    from gfservice.service.ray_cluster import attach_ray

    run_name = args.run or f"demo-{args.fault.replace('@', '-')}-{time.strftime('%H%M%S')}"
    workload = WorkloadConfig(run=run_name, steps=args.steps, fault=args.fault, parallel=args.parallel,
                              step_delay_s=args.step_delay)
    workload.fault_kind()  # a bad --fault fails here, before anything starts
    tmp = Path(tempfile.mkdtemp(prefix="gfservice-demo-"))
    settings = svc.load_service_settings(
        args.config,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        snapshot_path=str(tmp / "snapshot.json"),
        sd_file=str(tmp / "prometheus-sd.json"),
    )
    print(f"gfservice demo: run {run_name!r}, {args.workers} workers ({args.parallel}, gloo on CPU), "
          f"{args.steps} steps, fault {args.fault}")
    t0 = time.time()
    attach_ray(start="embedded", num_cpus=max(2, args.workers), namespace=settings.service.namespace)
    handle, _ = svc.start(settings)
    client = Client(handle)
    status = client.status()
    if status["metrics"]:
        print(f"  metrics: http://{status['metrics']}/metrics   (service discovery file {tmp / 'prometheus-sd.json'})")
    print(f"  service up in {time.time() - t0:.1f}s; starting the trainer")

    result: dict[str, Any] = {}
    trainer_thread = threading.Thread(target=_fit, args=(workload, args.workers, tmp, result), daemon=True)
    trainer_thread.start()
    seen: set[tuple] = set()
    last_line = ""
    while trainer_thread.is_alive():
        trainer_thread.join(1.0)
        last_line = _progress(client, run_name, args.steps, seen, last_line)
    _progress(client, run_name, args.steps, seen, last_line)
    row = next((r for r in client.runs() if r["run"] == run_name), None)
    if row is not None:
        print(f"\n  trained {args.steps} steps; last merged step {row['last_step']}, "
              f"{'finished' if row['finished'] else 'not finished'}, {row['sender_dropped']} reports dropped")
    if "error" in result:
        print(f"\ntraining failed: {result['error']}", file=sys.stderr)
        return 1
    findings = client.findings(run_name)
    print()
    _summary(findings)
    print(f"done in {time.time() - t0:.0f}s")
    if args.save_history:
        from gfservice.observability import history

        print(f"history saved to {history.save(args.save_history, client.history(run_name), findings)}")
    if args.report:
        from gfservice.observability.report import render

        render(client.history(run_name), findings, args.report)
        print(f"report written to {args.report}")
    if args.keep_serving:
        print("service still up (Ctrl-C to stop): gfservice status, gfservice stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    svc.stop(settings.service.name, settings.service.namespace)
    ray.shutdown()
    return 0


def _fit(workload, workers: int, tmp: Path, result: dict[str, Any]) -> None:
    try:
        from gfservice.cli.workload import fit

        result["result"] = fit(workload, workers, tmp / "ray_results")
    except Exception as exc:  # shown to the user by the main thread
        result["error"] = f"{type(exc).__name__}: {exc}"


def _progress(client, run: str, steps: int, seen: set, last_line: str) -> str:
    try:
        rows = {r["run"]: r for r in client.runs()}
        row = rows.get(run)
        if row is None:
            return last_line
        for f in client.findings(run):
            key = (f.detector, f.key, f.first_step)
            if key not in seen:
                seen.add(key)
                print(f"\n  ! step {f.first_step}: [{f.severity.value}] {f.detector}: {f.message}")
        line = f"  step {row['last_step'] + 1}/{steps}, active findings {row['active_findings']}"
        if line != last_line:
            print("\r" + line, end="", flush=True)
        return line
    except Exception as exc:  # the service may be restarting; progress is best effort
        return f"(service unavailable: {exc})"


def _summary(findings) -> None:
    if not findings:
        print("no findings: the run looked healthy")
        return
    from gfservice.api import describe_layers
    from gfservice.cli.tables import table

    rows = [(f.detector, f.severity.value, str(f.first_step), describe_layers(f.layers) if f.layers else "-",
             ",".join(map(str, f.ranks)) or "-") for f in findings]
    print(table(("detector", "severity", "step", "layers", "ranks"), rows, max_width=60))
