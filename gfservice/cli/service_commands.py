"""``gfservice serve``, ``gfservice status`` and ``gfservice stop``."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import time

from gfservice.service import actor as svc
from gfservice.service.ray_cluster import attach_ray


def add_parsers(sub) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", default=None,
                       help="Ray cluster address (default: $RAY_ADDRESS, else the cluster running on this machine)")
        p.add_argument("--name", default=svc.DEFAULT_NAME, help=f"service actor name (default {svc.DEFAULT_NAME})")
        p.add_argument("--namespace", default=svc.DEFAULT_NAMESPACE,
                       help=f"service actor namespace (default {svc.DEFAULT_NAMESPACE})")

    p = sub.add_parser("serve", help="start the long-lived service on a Ray cluster (or a new local one)",
                       description="Start the gfservice service as a detached Ray actor, or report the one "
                       "already running. Without --address and with no Ray running here, a local Ray head is "
                       "started first (`ray start --head`) so that the service outlives this command.")
    common(p)
    p.add_argument("--config", default=None, help="TOML/YAML configuration file (detectors, aggregator, service)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0: any free port; default: no endpoint)")
    p.add_argument("--metrics-addr", default=None, help="address of /metrics (default 127.0.0.1)")
    p.add_argument("--sd-file", default=None, help="Prometheus file_sd file the service writes its address to")
    p.add_argument("--snapshot", default=None, help="snapshot file for detector state and findings")
    p.set_defaults(func=_serve)

    p = sub.add_parser("status", help="runs, their last step, active findings and ingest counters")
    common(p)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=_status)

    p = sub.add_parser("stop", help="end the service (after a last snapshot)")
    common(p)
    p.add_argument("--ray", action="store_true", help="also stop the local Ray that `gfservice serve` started")
    p.set_defaults(func=_stop)


def _serve(args: argparse.Namespace) -> int:
    settings = svc.load_service_settings(
        args.config,
        name=args.name,
        namespace=args.namespace,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        sd_file=args.sd_file,
        snapshot_path=args.snapshot,
    )
    attach_ray(args.address, start="head")
    t0 = time.time()
    handle, created = svc.start(settings)
    import ray

    status = ray.get(handle.status.remote(), timeout=30)
    verb = "started" if created else "already running"
    print(f"gfservice {settings.service.namespace}/{settings.service.name} {verb} "
          f"(pid {status['pid']}, {time.time() - t0:.1f}s)")
    if status["metrics"]:
        print(f"  metrics: http://{status['metrics']}/metrics")
    if status["restored_runs"]:
        print(f"  restored {status['restored_runs']} runs from {settings.service.snapshot_path}")
    return 0


def _connect(args):
    from gfservice.service.client import connect

    return connect(args.address, args.name, args.namespace)


def _status(args: argparse.Namespace) -> int:
    status = _connect(args).status()
    if args.json:
        print(json.dumps(status, indent=2, default=str))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    """The status as a table a person reads."""
    c = status["counters"]
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(c["rejected"].items())) or "none"
    lines = [
        f"gfservice {status['version']}  pid {status['pid']}  up {status['uptime_s']:.0f}s  "
        f"metrics {status['metrics'] or 'off'}",
        f"messages accepted {c['accepted']}, rejected {rejected}",
        "",
    ]
    header = ("run", "world", "last step", "age", "findings", "dropped", "state")
    rows = [header]
    now = time.time()
    for r in status["runs"]:
        age = f"{now - r['last_time']:.0f}s" if r["last_time"] else "-"
        state = "finished" if r["finished"] else ("STOP" if r["stop_reason"] else "live")
        rows.append((r["run"], str(r["world_size"]), str(r["last_step"]), age, str(r["active_findings"]),
                     str(r["sender_dropped"]), state))
    if len(rows) == 1:
        lines.append("no runs yet")
    else:
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    for r in status["runs"]:
        for f in r["active"]:
            lines.append(f"  {r['run']}: [{f['severity']}] {f['detector']} since step {f['first_step']}: "
                         f"{f['message']}")
    return "\n".join(lines)


def _stop(args: argparse.Namespace) -> int:
    try:
        attach_ray(args.address)
    except ConnectionError:
        print("no Ray cluster here: nothing to stop")
        return 0
    stopped = svc.stop(args.name, args.namespace)
    print(f"gfservice {args.namespace}/{args.name} {'stopped' if stopped else 'was not running'}")
    if args.ray:
        import ray

        ray.shutdown()
        subprocess.run([shutil.which("ray") or "ray", "stop"], check=False, stdout=subprocess.DEVNULL)
        print("local Ray stopped")
    return 0
