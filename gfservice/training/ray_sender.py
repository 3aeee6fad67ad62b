"""Shipping reports to the service over Ray without ever blocking training.

The training thread only appends to a bounded queue (:class:`~gfservice.training.sending.QueuedSender`). The
sender thread takes batches from it and makes fire-and-forget actor calls, with a cap on calls in flight. Under
load it batches several steps per call; when the queue is full it drops the oldest report and counts the drop,
which the service then reports. Rejections that mean "the service forgot us" (a restart without snapshot)
re-send the layout.

In a large job the reports go through the node's merge agent (:mod:`gfservice.hosting.merge_agent`), which
merges the node's ranks and sends the service one message per step: from a world size of
:data:`~gfservice.hosting.merge_agent.AGENT_MIN_WORLD` ranks, or as ``$GFSERVICE_MERGE_AGENT`` says (``1``: always,
``0``: never). Queries (findings, latest step) still go to the service.

>>> wants_agent(4096, env={}), wants_agent(8, env={}), wants_agent(8, env={"GFSERVICE_MERGE_AGENT": "1"})
(True, False, True)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from gfservice.api import Finding, StepStats
from gfservice.envelopes import Batch, BatchAnswer
from gfservice.training.sending import QueuedSender

log = logging.getLogger(__name__)

#: The world size from which a rank sends through its node's merge agent by default: below it one aggregator
#: takes every rank's message at ease (see docs/explanation/scale-out.md).
AGENT_MIN_WORLD = 256


def wants_agent(world_size: int, env: Mapping[str, str] | None = None) -> bool:
    """Whether a rank of a job of ``world_size`` ranks sends through its node's merge agent."""
    choice = (os.environ if env is None else env).get("GFSERVICE_MERGE_AGENT", "").strip()
    if choice in ("0", "1"):
        return choice == "1"
    return world_size >= AGENT_MIN_WORLD


class RaySender(QueuedSender):
    """A :class:`~gfservice.training.transport.Transport` to the service actor ``handle``."""

    #: The Ray service counts a layout like a report (sent, and lost when rejected).
    layouts_are_reports = True

    def __init__(self, handle, run: str, queue_size: int = 256, max_in_flight: int = 1, batch_max: int = 32,
                 linger_s: float = 0.2, query_timeout_s: float = 10.0, token: str | None = None):
        self.handle = handle
        #: The service token sent with every batch and query (``None``: the service has none).
        self._auth = {"token": token} if token is not None else {}
        self.max_in_flight = max_in_flight
        self.query_timeout_s = query_timeout_s
        #: Calls in flight: (their answer's reference, layouts at the head of the batch, reports in it).
        self._in_flight: list[tuple[Any, int, int]] = []
        #: Where batches go: the service, or the node's merge agent (decided at the first batch).
        self._target: Any = None
        super().__init__(run, queue_size=queue_size, batch_max=batch_max, linger_s=linger_s,
                         thread_name=f"gfservice-sender-{run}", join_timeout_s=query_timeout_s + 5)

    # ---- the sender thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        import ray

        while True:
            if self._wait_for_work() and self._drained():
                break
            self._harvest(ray, block=len(self._in_flight) >= self.max_in_flight)
            if len(self._in_flight) >= self.max_in_flight:
                continue
            layouts, batch, drops = self._take()
            if not (layouts or batch or drops):
                continue
            out = Batch(run=self.run, messages=[dict(m) for m in (*layouts, *batch)], dropped=drops)
            try:
                ref = self._submit_target(layouts).submit.remote(out.messages, out.dropped_by_run(), **self._auth)
            except Exception:
                self._undelivered(layouts, batch, drops)
                log.debug("gfservice: submit failed", exc_info=True)
                time.sleep(0.2)
                continue
            self._in_flight.append((ref, len(layouts), len(out.messages)))
            self._handed_over(layouts, batch)
        self._harvest(ray, block=True, timeout=self.query_timeout_s)

    def _submit_target(self, layouts: list[Any]) -> Any:
        if self._target is None:
            self._target = self.handle
            world = max((getattr(m, "world_size", 1) for m in layouts), default=1)
            if wants_agent(world):
                try:
                    from gfservice.hosting.merge_agent import node_agent

                    self._target = node_agent(self.handle, self._auth.get("token"))
                except Exception as exc:  # no agent: the service takes the reports directly
                    log.info("gfservice: no node merge agent (%s); sending to the service directly", exc)
        return self._target

    def _harvest(self, ray, block: bool, timeout: float = 1.0) -> None:
        if not self._in_flight:
            return
        refs = [r for r, _, _ in self._in_flight]
        every = not block or self._closing  # closing waits for all; otherwise for one, or for none at all
        ready, _ = ray.wait(refs, num_returns=len(refs) if every else 1, timeout=timeout if block else 0)
        done = set(ready)
        keep = []
        for ref, n_layouts, n in self._in_flight:
            if ref not in done:
                keep.append((ref, n_layouts, n))
                continue
            try:
                answer = BatchAnswer.model_validate(ray.get(ref))
            except ValidationError:
                log.debug("gfservice: unreadable answer from the service", exc_info=True)
                continue
            except Exception:  # the service died with the call in flight: those reports are lost
                with self._cond:
                    self._lose(n)
                continue
            self._note_answer(answer, n_layouts)
        self._in_flight = keep

    def _idle(self) -> bool:
        return not self._in_flight

    # ---- queries (never on the training path) ----------------------------------------------------
    def _query(self, method: str, *args, default=None):
        import ray

        try:
            return ray.get(getattr(self.handle, method).remote(*args, **self._auth), timeout=self.query_timeout_s)
        except Exception as exc:
            log.warning("gfservice: %s query failed: %s", method, exc)
            return default

    def findings(self, run: str) -> list[Finding]:
        return self._query("findings", run, 0, default=[]) if self._known(run) else []

    def _known(self, run: str) -> bool:
        return any(r["run"] == run for r in self._query("runs", default=[]) or [])

    def latest(self, run: str) -> StepStats | None:
        return self._query("latest", run) if self._known(run) else None

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued has been delivered (or ``timeout_s``); True when it was."""
        return super().flush(timeout_s)
