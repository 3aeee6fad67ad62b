"""``gfservice serve``, ``gfservice status`` and ``gfservice stop``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gfservice.cli.tables import table
from gfservice.hosting import actor as svc
from gfservice.service import auth
from gfservice.service.ray_cluster import RayAuthError, attach_ray
from gfservice.service.state import SnapshotError, read_private_json, write_private_json

#: The file in the state directory that says `gfservice serve` started the local Ray head (and which one):
#: `gfservice stop --ray` stops only that Ray.
RAY_MARKER = "ray-head.json"


def add_parsers(sub) -> None:
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--address", default=None,
                       help="Ray cluster address (default: $RAY_ADDRESS, else the cluster running on this machine)")
        p.add_argument("--name", default=svc.DEFAULT_NAME, help=f"service actor name (default {svc.DEFAULT_NAME})")
        p.add_argument("--namespace", default=svc.DEFAULT_NAMESPACE,
                       help=f"service actor namespace (default {svc.DEFAULT_NAMESPACE})")
        p.add_argument("--config", default=None,
                       help="TOML/YAML configuration file (detectors, aggregator, service: state_dir, token_file)")

    p = sub.add_parser("serve", help="start the long-lived service on a Ray cluster (or a new local one)",
                       description="Start the gfservice service as a detached Ray actor, or report the one "
                       "already running. Without --address and with no Ray running here, a local Ray head is "
                       "started first (`ray start --head`) so that the service outlives this command.")
    common(p)
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0: any free port; default: no endpoint)")
    p.add_argument("--metrics-addr", default=None, help="address of /metrics (default 127.0.0.1)")
    p.add_argument("--sd-file", default=None, help="Prometheus file_sd file the service writes its address to")
    p.add_argument("--snapshot", default=None, help="snapshot file for detector state and findings")
    p.add_argument("--shards", type=int, default=None,
                   help="aggregator actors, runs spread over them by a hash of the run name (default 1; "
                   "[service] shards); each has its own /metrics, snapshot and discovery entry")
    p.set_defaults(func=_serve)

    p = sub.add_parser("status", help="runs, their last step, active findings and ingest counters")
    common(p)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.set_defaults(func=_status)

    p = sub.add_parser("stop", help="end the service (after a last snapshot)")
    common(p)
    p.add_argument("--ray", action="store_true",
                   help="also stop the local Ray, only if `gfservice serve` started it (`ray stop` on this machine)")
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
        shards=args.shards,
    )
    token = auth.load_token(settings.service.token_file)  # a bad token file fails before Ray is touched
    if attach_ray(args.address, start="head"):
        _record_ray_head(settings.service.state_dir)
    t0 = time.time()
    _shard0, created = svc.start(settings, token=token)
    from gfservice.service.client import connect

    try:
        status = connect(args.address, settings.service.name, settings.service.namespace, token=token).status()
    except PermissionError as exc:  # a service already running with another token
        print(f"gfservice: error: {exc}", file=sys.stderr)
        return 1
    verb = "started" if created else "already running"
    print(f"gfservice {settings.service.namespace}/{settings.service.name} {verb} "
          f"(pid {status['pid']}, {time.time() - t0:.1f}s)")
    if status.get("auth") == "token":
        print("  callers must present the service token (GFSERVICE_TOKEN or a token file)")
    if status["metrics"]:
        print(f"  metrics: http://{status['metrics']}/metrics")
    if status["restored_runs"]:
        where = "their shards' snapshots" if status.get("shards") else settings.service.snapshot_path
        print(f"  restored {status['restored_runs']} runs from {where}")
    if status.get("shards"):
        print(f"  {len(status['shards'])} shards: {', '.join(s['name'] for s in status['shards'])}")
    return 0


def _settings(args: argparse.Namespace):
    return svc.load_service_settings(args.config, name=args.name, namespace=args.namespace)


def _connect(args):
    from gfservice.service.client import connect

    token = auth.load_token(_settings(args).service.token_file)
    return connect(args.address, args.name, args.namespace, token=token)


def _status(args: argparse.Namespace) -> int:
    try:
        status = _connect(args).status()
    except PermissionError as exc:
        print(f"gfservice: error: {exc}", file=sys.stderr)
        return 1
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
        f"metrics {status['metrics'] or 'off'}  auth {status.get('auth', 'none')}",
        f"messages accepted {c['accepted']}, rejected {rejected}",
        "",
    ]
    header = ("run", "world", "last step", "age", "findings", "dropped", "state")
    rows = []
    now = time.time()
    for r in status["runs"]:
        age = f"{now - r['last_time']:.0f}s" if r["last_time"] else "-"
        state = "finished" if r["finished"] else ("STOP" if r["stop_reason"] else "live")
        rows.append((r["run"], str(r["world_size"]), str(r["last_step"]), age, str(r["active_findings"]),
                     str(r["sender_dropped"]), state))
    lines += table(header, rows, rule=False).splitlines() if rows else ["no runs yet"]
    for s in status.get("shards", []):  # a sharded service: one line per shard
        lines.append(f"  shard {s['name']}: pid {s['pid']}, {s['runs']} runs, metrics {s['metrics'] or 'off'}")
    for r in status["runs"]:
        for f in r["active"]:
            lines.append(f"  {r['run']}: [{f['severity']}] {f['detector']} since step {f['first_step']}: "
                         f"{f['message']}")
    return "\n".join(lines)


def _stop(args: argparse.Namespace) -> int:
    settings = _settings(args)
    token = auth.load_token(settings.service.token_file)
    try:
        attach_ray(args.address)
    except RayAuthError:
        raise
    except ConnectionError:
        print("no Ray cluster here: nothing to stop")
        return 0
    try:
        stopped = svc.stop(args.name, args.namespace, token=token)
    except PermissionError as exc:
        print(f"gfservice: error: {exc}; the service is still running", file=sys.stderr)
        return 1
    print(f"gfservice {args.namespace}/{args.name} {'stopped' if stopped else 'was not running'}")
    if args.ray:
        marker = Path(settings.service.state_dir).expanduser() / RAY_MARKER
        ours, why = ray_started_by_serve(marker)
        if not ours:
            print(f"this Ray was not started by gfservice serve ({why}); not stopping it")
            return 0
        import ray

        ray.shutdown()
        subprocess.run([shutil.which("ray") or "ray", "stop"], check=False, stdout=subprocess.DEVNULL)
        marker.unlink(missing_ok=True)
        print("local Ray stopped")
    return 0


def _record_ray_head(state_dir: str) -> Path:
    """Note in the state directory which Ray head `gfservice serve` started (mode 0600)."""
    import ray

    ctx = ray.get_runtime_context()
    return write_private_json(Path(state_dir).expanduser() / RAY_MARKER, {
        "started_by": "gfservice serve", "gcs_address": ctx.gcs_address, "session_name": ctx.get_session_name(),
        "time": time.time(), "pid": os.getpid()})


def ray_started_by_serve(marker: Path) -> tuple[bool, str]:
    """Whether the Ray cluster this process is attached to is the one `gfservice serve` started, per ``marker``
    (same session); with the reason when it is not."""
    import ray

    try:
        noted = read_private_json(marker)
    except FileNotFoundError:
        return False, f"no record of one in {marker}"
    except (SnapshotError, OSError) as exc:
        return False, f"its record cannot be read: {exc}"
    session = ray.get_runtime_context().get_session_name()
    if not isinstance(noted, dict) or noted.get("session_name") != session:
        return False, f"{marker} names another Ray session than this one ({session})"
    return True, ""
