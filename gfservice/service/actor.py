"""The long-lived service: the aggregator core in a detached, named Ray actor, with snapshots, a merge
ticker, the Prometheus endpoint and the file-based service-discovery file.

:class:`ServiceCore` is plain Python (tested without Ray); :func:`start` wraps it in a Ray actor placed
on the head node that Ray restarts when it dies, and which restores its snapshot when it comes back.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

from gfservice import __version__
from gfservice.api import Finding, StepStats
from gfservice.config import DEFAULT_NAME, DEFAULT_NAMESPACE, Settings, load_settings
from gfservice.service.aggregator import Aggregator

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
        self.aggregator = Aggregator(self.settings.aggregator, self.settings.detectors)
        self.started = time.time()
        self.restored = self._restore()
        self._snapshot_lock = threading.Lock()
        self._last_snapshot_accepted = -1
        self.metrics_port: int | None = None
        self._metrics_server = None
        if cfg.metrics_port is not None:
            self._start_metrics(cfg.metrics_port)
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="gfservice-ticker", daemon=True)
        self._ticker.start()

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
            self.snapshot()  # findings are rare and must survive a restart
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
        """Change the detectors of the live ``run`` (see :meth:`Aggregator.configure`); saved at once."""
        summary = self.aggregator.configure(run, settings)
        if summary["changed"]:
            self.snapshot()  # the change must survive a restart of the service
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
                    self.snapshot()
                if time.monotonic() - last_snap >= cfg.snapshot_interval_s:
                    last_snap = time.monotonic()
                    if self.aggregator.accepted != self._last_snapshot_accepted:
                        self.snapshot()
            except Exception:
                log.exception("gfservice ticker failed; continuing")

    def snapshot(self) -> None:
        """Save detector state and findings atomically to ``snapshot_path``."""
        path = self.settings.service.snapshot_path
        if not path:
            return
        with self._snapshot_lock:
            accepted = self.aggregator.accepted
            state = self.aggregator.state_dict()
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp{os.getpid()}")
            with open(tmp, "wb") as fh:
                pickle.dump({"version": 1, "time": time.time(), "state": state}, fh)
            os.replace(tmp, target)
            self._last_snapshot_accepted = accepted

    def _restore(self) -> int:
        path = self.settings.service.snapshot_path
        if not path or not Path(path).exists():
            return 0
        try:
            with open(path, "rb") as fh:
                saved = pickle.load(fh)
            self.aggregator.load_state_dict(saved["state"])
            n = len(saved["state"].get("runs", {}))
            log.warning("gfservice restored %d runs from %s", n, path)
            return n
        except Exception:
            log.exception("gfservice could not restore %s; starting empty", path)
            return 0

    def _start_metrics(self, port: int) -> None:
        from gfservice.observability.discovery import write_sd_file
        from gfservice.observability.exporter import serve_metrics

        cfg = self.settings.service
        exp = cfg.exporter_config(port)
        self._metrics_server, _thread, self.metrics_port = serve_metrics(self.aggregator, exp)
        if cfg.sd_file:
            write_sd_file(cfg.sd_file, f"{_advertised_host(cfg.metrics_addr)}:{self.metrics_port}")

    def shutdown(self) -> None:
        """Stop background work, save a last snapshot, withdraw the discovery entry (a deliberate stop)."""
        self._stop.set()
        self.aggregator.flush()
        self.snapshot()
        if self._metrics_server is not None:
            from gfservice.observability.discovery import remove_sd_file

            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            if self.settings.service.sd_file:
                remove_sd_file(self.settings.service.sd_file)


def _advertised_host(addr: str) -> str:
    if addr in ("0.0.0.0", "::", ""):
        import socket

        return socket.gethostbyname(socket.gethostname())
    return addr


# ---- Ray ------------------------------------------------------------------------------------------
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


def start(settings: Settings | None = None, wait_s: float = 60.0):
    """Start the service on the connected Ray cluster, or return the one already running (same name).

    Returns ``(handle, created)``.
    """
    import ray

    settings = settings or load_settings()
    cfg = settings.service
    existing = find(cfg.name, cfg.namespace)
    if existing is not None:
        return existing, False
    actor_cls = ray.remote(ServiceCore)
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
    ).remote(settings.model_dump())
    ray.get(handle.ping.remote(), timeout=wait_s)  # type: ignore[union-attr]  # an actor handle
    return handle, True


def stop(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE) -> bool:
    """End the running service (after a last snapshot). Returns False when none was running."""
    import ray

    handle = find(name, namespace)
    if handle is None:
        return False
    try:
        ray.get(handle.shutdown.remote(), timeout=30)
    except Exception:
        log.warning("gfservice did not shut down cleanly; killing it")
    ray.kill(handle, no_restart=True)
    return True
