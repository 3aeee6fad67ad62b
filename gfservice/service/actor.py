"""The long-lived service: the aggregator core in a detached, named Ray actor, with snapshots, a merge
ticker, the Prometheus endpoint and the file-based service-discovery file.

:class:`ServiceCore` is plain Python (tested without Ray); :func:`start` wraps it in a :class:`ServiceActor`,
a Ray actor placed on the head node that Ray restarts when it dies, and which restores its snapshot when it
comes back. Ray lets any holder of the handle call any method of the actor's class, private ones included, so
the actor class is a thin wrapper that has only the calls meant for clients, each checked against the optional
service token (:mod:`gfservice.service.auth`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from gfservice import __version__
from gfservice.api import Finding, StepStats
from gfservice.config import DEFAULT_NAME, DEFAULT_NAMESPACE, Settings, load_settings
from gfservice.service import auth
from gfservice.service.aggregator import Aggregator
from gfservice.service.state import (
    SnapshotError,
    ensure_private_dir,
    prev_path,
    read_snapshot,
    set_aside,
    write_snapshot,
)
from gfservice.wire import RejectReason

log = logging.getLogger(__name__)

#: The whole configuration of a service (one settings model: :class:`gfservice.config.Settings`).
ServiceSettings = Settings


def load_service_settings(path: str | os.PathLike[str] | None = None, **service_overrides: Any) -> Settings:
    """The configuration file (and ``GFSERVICE_*`` variables) with command-line ``[service]`` overrides."""
    return load_settings(path).with_service(**service_overrides)


class ServiceCore:
    """The service's state and behaviour, without Ray: the Ray actor is a thin wrapper around it."""

    def __init__(self, settings: dict[str, Any] | Settings | None = None):
        # Validated again here (the driver validated it too): no environment is read inside the actor.
        self.settings = Settings.model_validate(settings.model_dump() if isinstance(settings, Settings)
                                                else settings or {})
        cfg = self.settings.service
        for file in (cfg.snapshot_path, cfg.sd_file):  # private directories, or a clear error before anything
            if file:
                ensure_private_dir(Path(file).expanduser().parent)
        self.aggregator = Aggregator(self.settings.aggregator, self.settings.detectors)
        self.started = time.time()
        #: Snapshot writes that failed (all time) and when the last one succeeded (exported to Prometheus).
        self.snapshot_failures = 0
        self.snapshot_last_success: float | None = None
        self._failure_burst = 0
        self.restored = self._restore()
        self._snapshot_lock = threading.Lock()
        self._snapshot_wanted = threading.Event()
        self._last_snapshot_accepted = -1
        self.metrics_port: int | None = None
        self._metrics_server = None
        if cfg.metrics_port is not None:
            self._start_metrics(cfg.metrics_port)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="gfservice-ticker", daemon=True)
        self._ticker.start()
        self._writer = threading.Thread(target=self._write_loop, name="gfservice-snapshots", daemon=True)
        self._writer.start()

    # ---- ingest ---------------------------------------------------------------------------------
    def submit(self, messages: list[Any], dropped: dict[str, int] | None = None) -> dict[str, Any]:
        """Take a batch of messages; returns rejections ``[(index, reason)]`` and stop verdicts by run."""
        rejected: list[tuple[int, str]] = []
        new: list[Finding] = []
        runs: set[str] = set()
        if not isinstance(messages, list | tuple):
            messages = [messages]
        for i, msg in enumerate(messages):
            ack = self.aggregator.submit(msg)
            if not ack.accepted:
                rejected.append((i, ack.reason.value if ack.reason is not None else "invalid"))
            new.extend(ack.new_findings)
            if isinstance(msg, dict) and isinstance(msg.get("run"), str):
                runs.add(msg["run"])
        for run, n in (dropped or {}).items():
            self.aggregator.note_dropped(run, n)
        if new:
            self.request_snapshot()  # findings are rare and must survive a restart
        return {"rejected": rejected, "stop": {r: self.aggregator.should_stop(r) for r in runs}}

    # ---- queries --------------------------------------------------------------------------------
    def ping(self) -> str:
        return "pong"

    def runs(self) -> list[dict[str, Any]]:
        return self.aggregator.runs()

    def findings(self, run: str, since_step: int = 0, active_only: bool = False) -> list[Finding]:
        return self.aggregator.findings(run, since_step, active_only)

    def latest(self, run: str) -> StepStats | None:
        return self.aggregator.latest(run)

    def history(self, run: str) -> list[StepStats]:
        return self.aggregator.history(run)

    def configure(self, run: str, settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Change the detectors of the live ``run`` (see :meth:`Aggregator.configure`); saved at once (in the
        background)."""
        summary = self.aggregator.configure(run, settings)
        if summary["changed"]:
            self.request_snapshot()  # the change must survive a restart of the service
        return summary

    def status(self) -> dict[str, Any]:
        """Runs, counters and where the service can be scraped."""
        counters = self.aggregator.counters()
        cfg = self.settings.service
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": time.time() - self.started,
            "restored_runs": self.restored,
            "snapshot": self.snapshot_health(),
            "metrics": None if self.metrics_port is None else f"{cfg.metrics_addr}:{self.metrics_port}",
            "counters": counters,
            "runs": [{**r.row(), "active": [f.model_dump(exclude={"time"}) for f in r.active]}
                     for r in self.aggregator.view().runs],
        }

    # ---- background work ------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        cfg = self.settings.service
        last_snap = time.monotonic()
        while not self._stop.wait(cfg.tick_interval_s):
            try:
                if self.aggregator.tick():
                    self.request_snapshot()
                if time.monotonic() - last_snap >= cfg.snapshot_interval_s:
                    last_snap = time.monotonic()
                    if self.aggregator.accepted != self._last_snapshot_accepted:
                        self.request_snapshot()
            except Exception:
                log.exception("gfservice ticker failed; continuing")

    def request_snapshot(self) -> None:
        """Ask the writer thread for a snapshot; requests made while it writes coalesce into one more write."""
        self._snapshot_wanted.set()

    def _write_loop(self) -> None:
        while True:
            self._snapshot_wanted.wait()
            if self._stop.is_set():
                return
            self._snapshot_wanted.clear()
            self.snapshot()

    def snapshot(self) -> bool:
        """Save detector state and findings to ``snapshot_path`` now (atomically, fsynced; the previous one is
        kept). Never raises: a failure is counted, logged once per burst and exported. Returns success."""
        path = self.settings.service.snapshot_path
        if not path:
            return True
        with self._snapshot_lock:
            accepted = self.aggregator.accepted
            try:
                state = self.aggregator.state_dict()  # copied under the aggregator's lock; written without it
                write_snapshot(path, state)
            except Exception as exc:
                self.snapshot_failures += 1
                self._failure_burst += 1
                if self._failure_burst == 1:
                    log.error("gfservice could not save its snapshot to %s: %s (%s); submits are still taken, "
                              "retrying; failures are counted in gradflow_snapshot_failures_total",
                              path, exc, type(exc).__name__)
                return False
            if self._failure_burst:
                log.warning("gfservice saved its snapshot to %s again after %d failed attempts", path,
                            self._failure_burst)
            self._failure_burst = 0
            self.snapshot_last_success = time.time()
            self._last_snapshot_accepted = accepted
            return True

    def snapshot_health(self) -> dict[str, float | None]:
        """What the exporter publishes about snapshots (read at scrape time)."""
        return {"last_success": self.snapshot_last_success, "failures": float(self.snapshot_failures)}

    def _restore(self) -> int:
        """Restore the latest snapshot, else the previous one, into a fresh aggregator swapped in on success.

        A snapshot that cannot be read or restored is set aside (``*.corrupt-<time>.json``), never overwritten;
        one from a newer gfservice stops the service (:class:`~gfservice.service.state.SnapshotTooNew`)."""
        path = self.settings.service.snapshot_path
        if not path:
            return 0
        failed = []
        target = Path(path).expanduser()
        for stale in target.parent.glob(f".{target.name}.*.tmp"):  # a write cut short by a crash
            with contextlib.suppress(OSError):
                stale.unlink()
        for candidate in (target, prev_path(target)):
            try:
                doc = read_snapshot(candidate)
            except FileNotFoundError:
                continue
            except (SnapshotError, OSError) as exc:
                set_aside(candidate, str(exc))
                failed.append(candidate)
                continue
            fresh = Aggregator(self.settings.aggregator, self.settings.detectors)
            try:
                fresh.load_state_dict(doc["state"])
            except Exception as exc:
                log.exception("gfservice could not restore %s", candidate)
                set_aside(candidate, f"could not be restored: {type(exc).__name__}: {exc}")
                failed.append(candidate)
                continue
            self.aggregator = fresh
            runs = doc["state"].get("runs", {})
            findings = sum(len(r.get("log", [])) + len(r.get("active", [])) for r in runs.values())
            active = len([f for r in fresh.view().runs for f in r.active])
            names = ", ".join(sorted(runs)[:20]) + (", ..." if len(runs) > 20 else "")
            log.warning("gfservice restored %d runs (%s) with %d findings (%d active) from %s%s, saved at %s",
                        len(runs), names, findings, active, candidate, " (the previous snapshot)" if failed else "",
                        _when(doc.get("time")))
            return len(runs)
        if failed:
            log.error("gfservice found no usable snapshot (set aside: %s); starting empty",
                      ", ".join(map(str, failed)))
        return 0

    def _start_metrics(self, port: int) -> None:
        from gfservice.observability.discovery import write_sd_file
        from gfservice.observability.exporter import serve_metrics

        cfg = self.settings.service
        exp = cfg.exporter_config(port)
        self._metrics_server, _thread, self.metrics_port = serve_metrics(self.aggregator, exp,
                                                                         service_health=self.snapshot_health)
        if cfg.sd_file:  # where Prometheus should look: advertise_addr, else the bound address
            host = cfg.advertise_addr or _advertised_host(cfg.metrics_addr)
            if ":" in host and not host.startswith("["):  # an IPv6 address: [host]:port
                host = f"[{host}]"
            write_sd_file(cfg.sd_file, f"{host}:{self.metrics_port}", scheme="https" if exp.certfile else "http")

    def shutdown(self) -> None:
        """Stop background work, save a last snapshot, withdraw the discovery entry (a deliberate stop)."""
        self._stop.set()
        self._snapshot_wanted.set()  # wakes the writer, which ends
        self._writer.join(timeout=30)
        self.aggregator.flush()
        self.snapshot()
        if self._metrics_server is not None:
            from gfservice.observability.discovery import remove_sd_file

            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            if self.settings.service.sd_file:
                remove_sd_file(self.settings.service.sd_file)


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, int | float) else "?"


def _advertised_host(addr: str) -> str:
    if addr in ("0.0.0.0", "::", ""):
        import socket

        return socket.gethostbyname(socket.gethostname())
    return addr


# ---- Ray ------------------------------------------------------------------------------------------
class ServiceActor:
    """What Ray runs: a :class:`ServiceCore` behind the service token. Only these methods can be called through
    the actor handle; every one but :meth:`ping` refuses a caller without the token when the service has one.

    ``token_digest`` is the SHA-256 of the token (:func:`gfservice.service.auth.digest`), never the token: Ray
    keeps the actor's arguments to restart it.
    """

    def __init__(self, settings: dict[str, Any] | Settings | None = None, token_digest: str | None = None):
        self._guard = auth.Guard(token_digest)
        self._core = ServiceCore(settings)

    def ping(self) -> str:
        """Liveness, open to every caller (it says nothing about runs)."""
        return "pong"

    def submit(self, messages: list[Any], dropped: dict[str, int] | None = None,
               token: str | None = None) -> dict[str, Any]:
        """:meth:`ServiceCore.submit`; a batch without the token is refused whole and counted as ``unauthorized``
        (the answer has the same shape, so a sender's batching stays fire-and-forget)."""
        if not self._guard.allows(token):
            n = len(messages) if isinstance(messages, list | tuple) else 1
            self._core.aggregator.note_rejected(RejectReason.unauthorized, n)
            return {"rejected": [(i, RejectReason.unauthorized.value) for i in range(n)], "stop": {}}
        return self._core.submit(messages, dropped)

    def runs(self, token: str | None = None) -> list[dict[str, Any]]:
        self._guard.check(token, "runs()")
        return self._core.runs()

    def findings(self, run: str, since_step: int = 0, active_only: bool = False,
                 token: str | None = None) -> list[Finding]:
        self._guard.check(token, "findings()")
        return self._core.findings(run, since_step, active_only)

    def latest(self, run: str, token: str | None = None) -> StepStats | None:
        self._guard.check(token, "latest()")
        return self._core.latest(run)

    def history(self, run: str, token: str | None = None) -> list[StepStats]:
        self._guard.check(token, "history()")
        return self._core.history(run)

    def configure(self, run: str, settings: dict[str, dict[str, Any]], token: str | None = None) -> dict[str, Any]:
        self._guard.check(token, "configure()")
        return self._core.configure(run, settings)

    def status(self, token: str | None = None) -> dict[str, Any]:
        self._guard.check(token, "status()")
        return {**self._core.status(), "auth": "token" if self._guard.enabled else "none"}

    def shutdown(self, token: str | None = None) -> None:
        self._guard.check(token, "shutdown()")
        self._core.shutdown()


def _head_node_strategy():
    """Soft affinity to the head node, so the service sits next to the GCS and survives worker churn."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=True)
    return "DEFAULT"


def find(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE):
    """The running service's actor handle, or ``None``."""
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def start(settings: Settings | None = None, wait_s: float = 60.0, token: str | None = None):
    """Start the service on the connected Ray cluster, or return the one already running (same name).

    ``token`` (default: :func:`gfservice.service.auth.load_token`, i.e. ``$GFSERVICE_TOKEN`` or
    ``[service] token_file``) is the token every caller must then present; none: every caller is taken.
    Returns ``(handle, created)``.
    """
    import ray

    settings = settings or load_settings()
    cfg = settings.service
    if token is None:
        token = auth.load_token(cfg.token_file)
    existing = find(cfg.name, cfg.namespace)
    if existing is not None:
        return existing, False
    actor_cls = ray.remote(ServiceActor)
    handle = actor_cls.options(
        name=cfg.name,
        namespace=cfg.namespace,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=8,
        num_cpus=0,
        get_if_exists=True,
        scheduling_strategy=_head_node_strategy(),
    ).remote(settings.model_dump(), auth.digest(token) if token else None)
    ray.get(handle.ping.remote(), timeout=wait_s)  # type: ignore[union-attr]  # an actor handle
    return handle, True


def stop(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE, token: str | None = None) -> bool:
    """End the running service (after a last snapshot). Returns False when none was running.

    Raises :class:`~gfservice.service.auth.Unauthorized` (and leaves the service running) when the service has
    a token and ``token`` (default: ``$GFSERVICE_TOKEN`` or ``$GFSERVICE_SERVICE__TOKEN_FILE``) is not it.
    """
    import ray

    handle = find(name, namespace)
    if handle is None:
        return False
    if token is None:
        token = auth.load_token()
    try:
        ray.get(handle.shutdown.remote(token=token), timeout=30)
    except PermissionError as exc:
        raise auth.Unauthorized(*getattr(exc, "cause", exc).args) from None
    except Exception:
        log.warning("gfservice did not shut down cleanly; killing it")
    ray.kill(handle, no_restart=True)
    return True
