"""``gfservice.connect()``: ask the running service about runs, findings and merged steps.

>>> import gfservice
>>> gfservice.connect(address="127.0.0.1:1")   # doctest: +SKIP
Traceback (most recent call last):
ConnectionError: ...
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from gfservice.api import Finding, StepStats
from gfservice.config import DEFAULT_NAME, DEFAULT_NAMESPACE
from gfservice.errors import ConfigError
from gfservice.service import auth
from gfservice.service.ray_cluster import attach_ray
from gfservice.service.sharding import group_by_shard, merge_runs, merge_status, shard_for

log = logging.getLogger(__name__)


class Client:
    """A handle on the service; every call is a Ray actor call with a timeout, carrying ``token`` (the service
    token, when the service has one). A refused call raises :class:`~gfservice.service.auth.Unauthorized` (a
    ``PermissionError``) that says how to pass the token.

    ``shards`` (actor name -> handle, shard 0 first) is the fleet of a sharded service
    (:mod:`gfservice.service.sharding`): a run's calls go to its shard, and :meth:`runs` and :meth:`status` ask
    every shard and answer as one service. Without it the client talks to ``handle`` alone.
    """

    def __init__(self, handle, timeout_s: float = 30.0, token: str | None = None,
                 shards: Mapping[str, Any] | None = None):
        self.handle = handle
        self.timeout_s = timeout_s
        self.token = token
        self.shards: dict[str, Any] = dict(shards) if shards else {"": handle}
        #: Where each run was last seen (from :meth:`runs`): wins over the hash for a run that stayed on its
        #: old shard when the fleet grew.
        self._placement: dict[str, str] = {}

    def _get(self, refs):
        import ray

        try:
            return ray.get(refs, timeout=self.timeout_s)
        except PermissionError as exc:  # Ray wraps the service's refusal: raise it plainly, without traceback
            raise auth.Unauthorized(*getattr(exc, "cause", exc).args) from None

    def _remote(self, handle, method: str, *args):
        kwargs = {"token": self.token} if self.token is not None else {}
        return getattr(handle, method).remote(*args, **kwargs)

    def _call(self, method: str, *args):
        return self._get(self._remote(self.handle, method, *args))

    def _fan_out(self, method: str, *args) -> dict[str, Any]:
        """``method`` on every shard at once: shard name -> answer."""
        refs = [self._remote(h, method, *args) for h in self.shards.values()]
        return dict(zip(self.shards, self._get(refs), strict=True))

    def shard_of(self, run: str) -> str:
        """The actor name of the shard that holds ``run`` (``""`` for a service of one shard)."""
        names = list(self.shards)
        placed = self._placement.get(run)
        return placed if placed in self.shards else shard_for(run, names)

    def _on_shard(self, run: str, method: str, *args):
        return self._get(self._remote(self.shards[self.shard_of(run)], method, run, *args))

    def runs(self) -> list[dict[str, Any]]:
        """One row per run: last step, world size, active findings, whether it finished."""
        if len(self.shards) == 1:
            return self._call("runs")
        merged = merge_runs(self._fan_out("runs"))
        self._placement = {row["run"]: row["shard"] for row in merged}
        return merged

    def findings(self, run: str, since_step: int = 0, active_only: bool = False) -> list[Finding]:
        return self._on_shard(run, "findings", since_step, active_only)

    def latest(self, run: str) -> StepStats | None:
        """The last merged step of ``run`` (per-layer statistics in ``.grads``)."""
        return self._on_shard(run, "latest")

    def history(self, run: str) -> list[StepStats]:
        return self._on_shard(run, "history")

    def status(self) -> dict[str, Any]:
        """The service's :class:`~gfservice.envelopes.ServiceStatus` as plain data (``gfservice status --json``);
        of a sharded service, every shard's merged (:func:`~gfservice.service.sharding.merge_status`)."""
        if len(self.shards) == 1:
            return self._call("status")
        return merge_status(self._fan_out("status"))

    def configure(self, run: str, settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Change the detectors of the live ``run`` from its next step on: ``settings`` maps detector names to
        the fields to set. Returns what changed and from which step; raises ``ConfigError`` (naming the
        detector and field) or ``KeyError`` (unknown run) as the service does.
        """
        try:
            return self._on_shard(run, "configure", settings)
        except Exception as exc:  # Ray wraps the service's exception: raise the service's own, without traceback
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ConfigError | KeyError):
                raise type(cause)(*cause.args) from None
            raise

    def submit(self, messages: list[Any]) -> dict[str, Any]:
        """Send raw messages (tests and tools); training jobs use ``gfservice.monitor``. Answers a
        :class:`~gfservice.envelopes.BatchAnswer` as plain data (of a sharded service: each message sent to
        its run's shard, the answers joined, rejections by their index in ``messages``)."""
        if len(self.shards) == 1:
            return self._call("submit", messages)
        groups = group_by_shard(messages, list(self.shards))
        refs = [self._remote(self.shards[name], "submit", [messages[i] for i in idx]) for name, idx in groups.items()]
        answer: dict[str, Any] = {"rejected": [], "stop": {}}
        for idx, part in zip(groups.values(), self._get(refs), strict=True):
            answer["rejected"] += [[idx[i], reason] for i, reason in part.get("rejected", [])]
            answer["stop"].update(part.get("stop", {}))
            if part.get("findings") is not None:
                answer.setdefault("findings", []).extend(part["findings"])
        answer["rejected"].sort()
        return answer


def find(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE):
    """The running service's actor handle, or ``None`` (found by name: whichever gfservice version started it)."""
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def attach(address: str | None = None) -> None:
    """Attach this process to a Ray cluster (``address``, ``$RAY_ADDRESS`` or the local one) if not yet."""
    attach_ray(address)


def connect(address: str | None = None, name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE,
            timeout_s: float = 30.0, token: str | None = None) -> Client:
    """A :class:`Client` for the service on the Ray cluster at ``address`` (default: the one running here).

    ``token``: the service token, if the service has one (default ``$GFSERVICE_TOKEN``, else the file named by
    ``$GFSERVICE_SERVICE__TOKEN_FILE``).
    """
    if token is None:
        token = auth.load_token()
    attach(address)
    handle = find(name, namespace)
    if handle is None:
        raise ConnectionError(
            f"no gfservice service named {namespace}/{name} on this Ray cluster; start one with `gfservice serve`"
        )
    names = shard_list(handle, timeout_s)
    if len(names) == 1:
        return Client(handle, timeout_s, token)
    shards = {n: find(n, namespace) for n in names}
    missing = [n for n, h in shards.items() if h is None]
    if missing:
        raise ConnectionError(f"gfservice {namespace}/{name} has {len(names)} shards but {', '.join(missing)} "
                              "is not running; start it with `gfservice serve` (same --shards)")
    return Client(handle, timeout_s, token, shards=shards)


def shard_list(handle, timeout_s: float = 30.0) -> list[str]:
    """The actor names of every shard of the service whose shard 0 is ``handle`` (one name: not sharded, or a
    service from before shards, which has no ``shards`` method)."""
    import ray

    try:
        method = handle.shards
    except AttributeError:
        return [""]
    return list(ray.get(method.remote(), timeout=timeout_s))


def find_for_run(name: str, namespace: str, run: str):
    """The handle of the shard of the service ``namespace/name`` that holds ``run`` (its only actor when the
    service has one shard), or ``None`` when the service or that shard is not running. Senders use it."""
    handle = find(name, namespace)
    if handle is None:
        return None
    try:
        names = shard_list(handle, timeout_s=10.0)
    except Exception as exc:  # shard 0 restarting or unreachable: a monitor must not fail for it
        log.warning("gfservice: cannot read the shards of %s/%s (%s); sending run %r to shard 0", namespace, name,
                    exc, run)
        return handle
    return handle if len(names) == 1 else find(shard_for(run, names), namespace)
