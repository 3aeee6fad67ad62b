"""How a monitor's messages reach an aggregator: in this process, or (later) a service.

A transport takes :class:`~gfservice.wire.Layout` and :class:`~gfservice.wire.StepReport` messages and
answers the monitor's questions (findings, stop verdict, latest step). It never raises into the
training loop for a lost message: it counts it in ``dropped``.
"""

from __future__ import annotations

import logging
from typing import Protocol

from gfservice.api import Finding, StepStats
from gfservice.service.aggregator import Aggregator
from gfservice.wire import Layout, RunEnd, StepReport

log = logging.getLogger(__name__)


class Transport(Protocol):
    dropped: int

    def send(self, message: Layout | StepReport | RunEnd) -> None: ...

    def findings(self, run: str) -> list[Finding]: ...

    def stop_reason(self, run: str) -> str | None: ...

    def latest(self, run: str) -> StepStats | None: ...

    def close(self) -> None: ...


class InProcessTransport:
    """Hands messages straight to an :class:`Aggregator` living in this process."""

    def __init__(self, aggregator: Aggregator):
        self.aggregator = aggregator
        self.dropped = 0
        self.rejected = 0

    def send(self, message: Layout | StepReport | RunEnd) -> None:
        ack = self.aggregator.submit(message)
        if not ack.accepted:
            self.rejected += 1
            log.warning("gfservice: aggregator rejected a message: %s", ack.reason)

    def findings(self, run: str) -> list[Finding]:
        try:
            return self.aggregator.findings(run)
        except KeyError:
            return []

    def stop_reason(self, run: str) -> str | None:
        return self.aggregator.should_stop(run)

    def latest(self, run: str) -> StepStats | None:
        try:
            return self.aggregator.latest(run)
        except KeyError:
            return None

    def close(self) -> None:
        self.aggregator.flush()


def connect_service(service: str, run: str) -> Transport | None:
    """A transport to a running gfservice service, or ``None`` when none is reachable.

    ``service`` is ``"auto"`` (the default service, only when this process is attached to a Ray cluster or
    ``RAY_ADDRESS`` is set), or ``"NAME"`` / ``"NAMESPACE/NAME"`` of a service actor.
    """
    from gfservice.config import DEFAULT_NAME, DEFAULT_NAMESPACE
    from gfservice.service.ray_cluster import attach_ray, ray_reachable

    name, namespace = DEFAULT_NAME, DEFAULT_NAMESPACE
    if service != "auto":
        namespace, _, name = service.rpartition("/")
        namespace = namespace or DEFAULT_NAMESPACE
    elif not ray_reachable():
        return None
    try:
        attach_ray()
        from gfservice.service.actor import find
    except (ImportError, ConnectionError) as exc:
        log.info("gfservice: no Ray cluster to attach to (%s); using an in-process aggregator", exc)
        return None
    handle = find(name, namespace)
    if handle is None:
        log.info("gfservice: no service %s/%s; using an in-process aggregator", namespace, name)
        return None
    from gfservice.training.ray_sender import RaySender

    return RaySender(handle, run)
