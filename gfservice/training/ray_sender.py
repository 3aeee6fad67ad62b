"""Shipping reports to the service over Ray without ever blocking training.

The training thread only appends to a bounded queue. A background sender thread takes batches from it
and makes fire-and-forget actor calls, with a cap on calls in flight. Under load it batches several steps
per call; when the queue is full it drops the oldest report and counts the drop, which the service then
reports. Rejections that mean "the service forgot us" (a restart without snapshot) re-send the layout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

from gfservice.api import Finding, StepStats
from gfservice.training.transport import TransportBase
from gfservice.wire import Layout, RejectReason, RunEnd, StepReport

log = logging.getLogger(__name__)

#: Rejections that mean "the service forgot us" (a restart without snapshot): the layout is sent again.
_RESEND_LAYOUT = {RejectReason.unknown_run, RejectReason.unknown_rank}


class RaySender(TransportBase):
    """A :class:`~gfservice.training.transport.Transport` to the service actor ``handle``."""

    def __init__(self, handle, run: str, queue_size: int = 256, max_in_flight: int = 1, batch_max: int = 32,
                 linger_s: float = 0.2, query_timeout_s: float = 10.0, token: str | None = None):
        self.handle = handle
        self.run = run
        #: The service token sent with every batch and query (``None``: the service has none).
        self._auth = {"token": token} if token is not None else {}
        self._warned_unauthorized = False
        self.queue_size = queue_size
        self.max_in_flight = max_in_flight
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.query_timeout_s = query_timeout_s
        self.dropped = 0  # all drops so far
        self.sent = 0
        self.rejected: dict[str, int] = {}
        self._unreported_drops = 0
        self._queue: deque[dict[str, Any]] = deque()
        self._cond = threading.Condition()
        self._in_flight: list[Any] = []
        self._layouts: list[dict[str, Any]] = []
        self._stop_reason: str | None = None
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"gfservice-sender-{run}", daemon=True)
        self._thread.start()

    # ---- the training thread's side: append and return ------------------------------------------
    def send(self, message: Layout | StepReport | RunEnd) -> None:
        item = dict(message)
        with self._cond:
            if isinstance(message, Layout):
                self._layouts.append(item)
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self._count_lost(1)
            self._queue.append(item)
            # Waking the sender costs the training thread more than the append: do it only when a batch is
            # full or the message must not wait; otherwise the sender picks it up within linger_s.
            if len(self._queue) >= self.batch_max or not isinstance(message, StepReport):
                self._cond.notify()

    # ---- the sender thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        import ray

        while True:
            with self._cond:
                if len(self._queue) < self.batch_max and not self._closing:
                    self._cond.wait(self.linger_s)
                if self._closing and not self._queue:
                    break
            self._harvest(ray, block=len(self._in_flight) >= self.max_in_flight)
            if len(self._in_flight) >= self.max_in_flight:
                continue
            with self._cond:
                batch = [self._queue.popleft() for _ in range(min(self.batch_max, len(self._queue)))]
                drops, self._unreported_drops = self._unreported_drops, 0
            if not batch and not drops:
                continue
            try:
                ref = self.handle.submit.remote(batch, {self.run: drops} if drops else None, **self._auth)
                self._in_flight.append((ref, len(batch)))
                self.sent += len(batch)
            except Exception:
                with self._cond:
                    self._count_lost(len(batch))
                    self._unreported_drops += drops  # not delivered either: report them next time
                log.debug("gfservice: submit failed", exc_info=True)
                time.sleep(0.2)
        self._harvest(ray, block=True, timeout=self.query_timeout_s)

    def _harvest(self, ray, block: bool, timeout: float = 1.0) -> None:
        if not self._in_flight:
            return
        refs = [r for r, _ in self._in_flight]
        every = not block or self._closing  # closing waits for all; otherwise for one, or for none at all
        ready, _ = ray.wait(refs, num_returns=len(refs) if every else 1, timeout=timeout if block else 0)
        done = set(ready)
        keep = []
        for ref, n in self._in_flight:
            if ref not in done:
                keep.append((ref, n))
                continue
            try:
                answer = ray.get(ref)
            except Exception:  # the service died with the call in flight: those reports are lost
                with self._cond:
                    self._count_lost(n)
                continue
            self._on_answer(answer)
        self._in_flight = keep

    def _count_lost(self, n: int) -> None:
        """Count ``n`` reports that will not reach the service (caller holds ``_cond``)."""
        self.dropped += n
        self._unreported_drops += n

    def _on_answer(self, answer: dict[str, Any]) -> None:
        stop = answer.get("stop", {}).get(self.run)
        if stop:
            self._stop_reason = stop
        resend = False
        lost = 0
        for _i, reason in answer.get("rejected", []):
            why = RejectReason(reason)
            self.rejected[why.value] = self.rejected.get(why.value, 0) + 1
            resend |= why in _RESEND_LAYOUT
            lost += 1
        if self.rejected.get(RejectReason.unauthorized.value) and not self._warned_unauthorized:
            self._warned_unauthorized = True
            log.warning("gfservice: the service refused this job's reports (unauthorized): it has a token; set "
                        "GFSERVICE_TOKEN (or GFSERVICE_SERVICE__TOKEN_FILE) in the training workers' environment")
        if lost:  # a rejected report is a lost one: count it with the drops the service reports
            with self._cond:
                self._count_lost(lost)
        if resend:
            with self._cond:
                for lay in self._layouts:
                    self._queue.appendleft(lay)

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

    def stop_reason(self, run: str) -> str | None:
        return self._stop_reason

    def latest(self, run: str) -> StepStats | None:
        return self._query("latest", run) if self._known(run) else None

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued has been delivered (or ``timeout_s``); True when it was."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                empty = not self._queue
            if empty and not self._in_flight:
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=self.query_timeout_s + 5)
