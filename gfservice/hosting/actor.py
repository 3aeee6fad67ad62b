"""The long-lived service as Ray runs it: a detached, named actor on the head node hosting a
:class:`~gfservice.service.core.ServiceCore` with its Prometheus endpoint and file-based discovery entry.

:class:`ServiceHost` is plain Python (tested without Ray); :func:`start` wraps it in a :class:`ServiceActor`,
a Ray actor placed on the head node that Ray restarts when it dies, and which restores its snapshot when it
comes back. Ray lets any holder of the handle call any method of the actor's class, private ones included, so
the actor class is a thin wrapper that has only the calls meant for clients, each checked against the optional
service token (:mod:`gfservice.service.auth`). Answers travel as plain data (the wire models' ``model_dump``),
so a client of another gfservice version reads them.

Ray also gives every actor built-in methods a handle holder can call: ``__ray_call__`` (run any function on the
actor instance), ``__ray_terminate__`` (end the actor for good: no restart) and ``__ray_ready__``, and ``__init__``
is in the method table too. :class:`ServiceActor` brings its own (Ray then adds none): ``__ray_call__`` is always
refused, ``__ray_terminate__`` needs the token, ``__init__`` runs once per process. What no actor can refuse
(``ray.kill``, code run on the cluster as the same user) is in SECURITY.md.

The actor keeps its name and namespace (``[service] name``/``namespace``, default ``gfservice/gfservice``) and
its class name (``ServiceActor``): a service started by an earlier version is found, and stopped, by name.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from gfservice.api import Finding, StepStats
from gfservice.config import DEFAULT_NAME, DEFAULT_NAMESPACE, Settings, load_settings
from gfservice.envelopes import BatchAnswer
from gfservice.hosting.scrape import scrape_host
from gfservice.observability.discovery import remove_sd_file, write_sd_file
from gfservice.observability.exporter import serve_metrics
from gfservice.service import auth
from gfservice.service.client import find
from gfservice.service.core import ServiceCore
from gfservice.service.sharding import fleet_of, shard_index, shard_settings
from gfservice.wire import RejectReason

__all__ = ["DEFAULT_NAME", "DEFAULT_NAMESPACE", "ServiceActor", "ServiceHost", "ServiceSettings", "find",
           "load_service_settings", "start", "stop"]

log = logging.getLogger(__name__)

#: The whole configuration of a service (one settings model: :class:`gfservice.config.Settings`).
ServiceSettings = Settings


def load_service_settings(path: str | os.PathLike[str] | None = None, **service_overrides: Any) -> Settings:
    """The configuration file (and ``GFSERVICE_*`` variables) with command-line ``[service]`` overrides."""
    return load_settings(path).with_service(**service_overrides)


class ServiceHost(ServiceCore):
    """A :class:`~gfservice.service.core.ServiceCore` with ``/metrics`` on ``[service] metrics_port`` (none when
    unset) and its address in ``[service] sd_file`` for Prometheus; :meth:`shutdown` withdraws both."""

    def __init__(self, settings: dict[str, Any] | Settings | None = None):
        super().__init__(settings)
        self.metrics_port: int | None = None
        self._metrics_server: Any = None
        port = self.settings.service.metrics_port
        if port is not None:
            try:
                self._serve_metrics(port)
            except BaseException:
                super().shutdown()
                raise

    def _serve_metrics(self, port: int) -> None:
        cfg = self.settings.service
        exp = cfg.exporter_config(port)
        self._metrics_server, _thread, self.metrics_port = serve_metrics(
            self.aggregator, exp, service_health=lambda: self.snapshot_health().model_dump())
        self.metrics_address = f"{cfg.metrics_addr}:{self.metrics_port}"
        if cfg.sd_file:  # where Prometheus should look: advertise_addr, else the bound address
            host = scrape_host(cfg.metrics_addr, cfg.advertise_addr)
            try:
                write_sd_file(cfg.sd_file, f"{host}:{self.metrics_port}", scheme="https" if exp.certfile else "http")
            except OSError as exc:  # a full or read-only disk: /metrics is served, Prometheus must be told by hand
                self.state_disk_failed(f"cannot write the discovery file {cfg.sd_file} (point Prometheus at "
                                       f"{host}:{self.metrics_port} by hand meanwhile)", exc)

    def shutdown(self) -> None:
        """Stop background work, save a last snapshot, withdraw ``/metrics`` and the discovery entry."""
        super().shutdown()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            if self.settings.service.sd_file:
                remove_sd_file(self.settings.service.sd_file)


class _OwnRayMethods(type):
    """The metaclass of :class:`ServiceActor`: its ``__ray_actor_class__`` (the class itself) tells Ray the class
    needs none of Ray's built-in methods. A property of the metaclass, not a class attribute: Ray disassembles
    the class's attributes, and the class itself among them would recurse forever."""

    @property
    def __ray_actor_class__(cls) -> type:
        return cls


class ServiceActor(metaclass=_OwnRayMethods):
    """What Ray runs: a :class:`ServiceHost` behind the service token. Only these methods can be called through
    the actor handle; every one but :meth:`ping` refuses a caller without the token when the service has one.

    ``token_digest`` is the SHA-256 of the token (:func:`gfservice.service.auth.digest`), never the token: Ray
    keeps the actor's arguments to restart it.
    """

    def __init__(self, settings: dict[str, Any] | Settings | None = None, token_digest: str | None = None):
        if "_guard" in self.__dict__:  # called again through the handle: it would replace the guard
            raise PermissionError("gfservice: the service is running; __init__ cannot be called through the handle")
        self._guard = auth.Guard(token_digest)
        self._core = ServiceHost(settings)

    def __ray_ready__(self) -> bool:
        """Ray's readiness probe (kept: Ray's libraries call it); says nothing about runs."""
        return True

    def __ray_call__(self, fn: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Ray's "run any function in the actor": always refused (it would read findings and replace the guard)."""
        raise PermissionError("gfservice: __ray_call__ is refused by the service actor; use its methods")

    def __ray_terminate__(self, token: str | None = None) -> None:
        """Ray's "end the actor for good", with the token only (``gfservice stop`` saves a snapshot first)."""
        self._guard.check(token, "__ray_terminate__()")
        self._core.shutdown()
        import ray

        ray.actor.exit_actor()

    def ping(self) -> str:
        """Liveness, open to every caller (it says nothing about runs)."""
        return "pong"

    def shards(self) -> list[str]:
        """The actor names of every shard of this service, shard 0 first (open to every caller, like
        :meth:`ping`: clients and senders read it to route a run to its shard)."""
        cfg = self._core.settings.service
        return fleet_of(cfg.name, cfg.shards)

    def submit(self, messages: list[Any], dropped: dict[str, int] | None = None,
               token: str | None = None) -> dict[str, Any]:
        """:meth:`ServiceCore.submit`, answered as a plain :class:`~gfservice.envelopes.BatchAnswer`; a batch without
        the token is refused whole and counted as ``unauthorized`` (the answer has the same shape, so a sender's
        batching stays fire-and-forget)."""
        if not self._guard.allows(token):
            n = len(messages) if isinstance(messages, list | tuple) else 1
            self._core.aggregator.note_rejected(RejectReason.unauthorized, n)
            return BatchAnswer(rejected=[(i, RejectReason.unauthorized) for i in range(n)]).plain()
        return self._core.submit(messages, dropped).plain()

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
        """A :class:`~gfservice.envelopes.ServiceStatus` as plain data."""
        self._guard.check(token, "status()")
        status = self._core.status().model_copy(update={"auth": "token" if self._guard.enabled else "none"})
        return status.model_dump()

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


def start(settings: Settings | None = None, wait_s: float = 60.0, token: str | None = None):
    """Start the service on the connected Ray cluster, or return the one already running (same name).

    ``token`` (default: :func:`gfservice.service.auth.load_token`, i.e. ``$GFSERVICE_TOKEN`` or
    ``[service] token_file``) is the token every caller must then present; none: every caller is taken.
    With ``[service] shards`` > 1 every shard is started (a missing one is started beside a running service);
    the handle is shard 0's (:func:`gfservice.connect` finds the others through it). Returns ``(handle, created)``.
    """
    import ray

    settings = settings or load_settings()
    cfg = settings.service
    if token is None:
        token = auth.load_token(cfg.token_file)
    existing = find(cfg.name, cfg.namespace)
    if existing is not None and cfg.shards == 1:
        return existing, False
    digest = auth.digest(token) if token else None
    strategy = _head_node_strategy()
    handles = [_start_actor(ray, shard_settings(settings, i), digest, strategy) for i in range(cfg.shards)]
    ray.get([h.ping.remote() for h in handles], timeout=wait_s)
    return handles[0], existing is None


def _start_actor(ray: Any, settings: Settings, token_digest: str | None, strategy: Any) -> Any:
    """One detached, restartable service actor (or the running one of that name)."""
    cfg = settings.service
    return ray.remote(ServiceActor).options(
        name=cfg.name,
        namespace=cfg.namespace,
        lifetime="detached",
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=8,
        num_cpus=0,
        get_if_exists=True,
        scheduling_strategy=strategy,
    ).remote(settings.model_dump(), token_digest)


def _other_shards(ray: Any, name: str, namespace: str) -> list[Any]:
    """Handles of the running shards ``name-shard-i`` of the service ``name``, whatever its ``shards`` now."""
    found = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor.get("namespace") == namespace and (shard_index(name, actor.get("name", "")) or 0) > 0:
            handle = find(actor["name"], namespace)
            if handle is not None:
                found.append(handle)
    return found


def stop(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE, token: str | None = None) -> bool:
    """End the running service (after a last snapshot). Returns False when none was running.

    Raises :class:`~gfservice.service.auth.Unauthorized` (and leaves the service running) when the service has
    a token and ``token`` (default: ``$GFSERVICE_TOKEN`` or ``$GFSERVICE_SERVICE__TOKEN_FILE``) is not it.
    """
    import ray

    handle = find(name, namespace)
    others = _other_shards(ray, name, namespace)
    if handle is None and not others:
        return False
    if token is None:
        token = auth.load_token()
    for h in [handle, *others] if handle is not None else others:  # shard 0 first: a refused token stops none
        try:
            ray.get(h.shutdown.remote(token=token), timeout=30)
        except PermissionError as exc:
            raise auth.Unauthorized(*getattr(exc, "cause", exc).args) from None
        except Exception:
            log.warning("gfservice did not shut down cleanly; killing it")
        ray.kill(h, no_restart=True)
    return True
