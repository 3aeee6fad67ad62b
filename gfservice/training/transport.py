"""How a monitor's messages reach an aggregator: in this process (:class:`InProcessTransport`), a service
(:class:`~gfservice.training.ray_sender.RaySender`) or rank 0 of the job
(:class:`~gfservice.training.peer_sender.PeerSender`).

A transport takes :class:`~gfservice.wire.Layout` and :class:`~gfservice.wire.StepReport` messages and
answers the monitor's questions (findings, stop verdict, latest step, history): the :class:`Transport` protocol.
It never raises into the training loop for a lost message: it counts it in ``dropped``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from gfservice.api import Finding, StepStats
from gfservice.service.aggregator import Aggregator
from gfservice.wire import Layout, RunEnd, StepReport

log = logging.getLogger(__name__)


class Transport(Protocol):
    """Everything a monitor asks of its transport. :class:`TransportBase` gives the optional parts to the
    transports that lack them (no aggregator in this process, no history)."""

    dropped: int

    @property
    def aggregator(self) -> Aggregator | None:
        """The aggregator in this process that the messages reach, once it has them; None when it is elsewhere."""
        ...

    def send(self, message: Layout | StepReport | RunEnd) -> None: ...

    def findings(self, run: str) -> list[Finding]: ...

    def stop_reason(self, run: str) -> str | None: ...

    def latest(self, run: str) -> StepStats | None: ...

    def history(self, run: str) -> list[StepStats]:
        """The run's merged steps that this transport can read ([] when it can read none)."""
        ...

    def close(self) -> None: ...


def merged_steps(aggregator: Aggregator | None, run: str) -> list[StepStats]:
    """Every merged step of ``run`` that ``aggregator`` keeps, once its detectors have judged the steps that are
    ready; [] without an aggregator. A step still waiting for a rank stays out: reading the history of a live
    job must not merge it without the ranks whose reports are on their way (they would read as stalled).

    >>> merged_steps(None, "r")
    []
    """
    if aggregator is None:
        return []
    aggregator.flush(run, force=False)
    try:
        return aggregator.history(run)
    except KeyError:
        return []


class TransportBase:
    """The optional parts of a :class:`Transport`: no aggregator in this process unless a subclass sets one, and
    the merged steps of that aggregator as the history (none without it: a service keeps its own).

    >>> TransportBase().history("r")
    []
    """

    #: The aggregator in this process that the messages reach (rank 0 of a job that hosts it), or None.
    aggregator: Aggregator | None = None

    def history(self, run: str) -> list[StepStats]:
        """The run's merged steps that this transport can read ([] when the aggregator is elsewhere)."""
        return merged_steps(self.aggregator, run)


#: How long the in-process worker lets the training thread run before it judges a message it was just sent.
_YIELD_S = 0.005
#: How long ``send`` waits at least for the previous message to be judged before it stops waiting (detection is
#: behind). The wait follows how long judging takes on this machine: ``HANDOFF_WAIT_FACTOR`` times the median of
#: the recent messages' hand-off-to-verdict times, at most ``HANDOFF_WAIT_MAX_S``: a busy machine slows every
#: verdict alike and the wait stretches with them; one hung detector is a sudden outlier, and the wait ends.
HANDOFF_WAIT_S = 0.005
HANDOFF_WAIT_FACTOR = 4.0
HANDOFF_WAIT_MAX_S = 0.1
#: Messages queued for the in-process worker at most; past it the oldest step reports are dropped (counted).
HANDOFF_QUEUE = 64


class InProcessTransport:
    """Hands messages to an :class:`Aggregator` living in this process, on a background thread.

    ``send`` only queues the message: merging and the detectors run off the training thread. While the
    detectors keep up, ``send`` first waits for the previous message to be judged, so ``stop_reason`` is at
    most one step late; but it waits at most ``handoff_wait_s``: when detection falls behind (a slow or hung
    detector), ``send`` stops waiting until the worker has caught up (such sends are counted in ``late``), and past
    ``queue_size`` queued messages the oldest step reports are dropped (counted in ``dropped``, and told to
    the aggregator as the run's sender drops). ``findings``, ``latest``, :meth:`flush` and the ``aggregator``
    attribute wait for the messages sent so far; ``close`` ships everything. ``background=False`` submits on
    the caller's thread.

    >>> from gfservice.wire import Layout
    >>> t = InProcessTransport(Aggregator())
    >>> t.send(Layout(run="r", rank=0, world_size=1, layers=["w"], numel=[4], sharded=[False]))
    >>> t.latest("r"), t.findings("r"), t.rejected
    (None, [], 0)
    >>> t.close()
    """

    def __init__(self, aggregator: Aggregator, background: bool = True, handoff_wait_s: float = HANDOFF_WAIT_S,
                 queue_size: int = HANDOFF_QUEUE):
        self._aggregator = aggregator
        self.background = background
        self.handoff_wait_s = handoff_wait_s
        self.queue_size = max(1, queue_size)
        self.dropped = 0
        #: Messages sent before the previous one was judged (the detectors fell behind the training steps).
        self.late = 0
        self._behind = False
        self._warned_late = False
        self._untold: dict[str, int] = {}  # drops by run not yet told to the aggregator
        self.rejected = 0
        self.errors = 0  # submissions that raised (logged; the training loop never sees them)
        self._cond = threading.Condition()
        self._queue: deque[Layout | StepReport | RunEnd] = deque()
        self._busy = False
        self._closed = False
        self._waited = False  # hand_off() has waited for the next send already
        #: Called first by :meth:`flush`: whatever holds messages on their way to ``send`` (a monitor's shipper)
        #: hands them over.
        self.feeders: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._last_send = time.perf_counter()
        self._yield_s = 0.0
        #: Seconds from taking a message off the queue to its verdict, for the most recent messages.
        self._judge_s: deque[float] = deque(maxlen=16)

    @property
    def aggregator(self) -> Aggregator:
        """The aggregator, once every message sent so far has reached it."""
        self.flush()
        return self._aggregator

    def send(self, message: Layout | StepReport | RunEnd) -> None:
        if not self.background or self._closed:
            self._submit(message)
            return
        with self._cond:
            if self._waited:
                self._waited = False
            else:
                self._hand_off_wait()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="gfservice-inprocess", daemon=True)
                self._thread.start()
            now = time.perf_counter()
            # a tenth of the time between messages, at most _YIELD_S: a loop of tiny steps is not slowed down
            self._yield_s = min(_YIELD_S, 0.1 * (now - self._last_send))
            self._last_send = now
            self._queue.append(message)
            if len(self._queue) > self.queue_size:
                self._drop_oldest_report()
            self._cond.notify_all()

    def hand_off(self) -> None:
        """The wait of the next :meth:`send`, now, on the caller's thread (a monitor whose reports are sent by
        another thread): at most ``handoff_wait`` for every message sent so far to be judged (late ones counted in
        ``late``); that send then does not wait again."""
        if not self.background or self._closed:
            return
        if not self._behind and self._idle():  # the usual step: judged long ago, no lock taken
            self._waited = True
            return
        with self._cond:
            self._hand_off_wait()
            self._waited = True

    def _idle(self) -> bool:
        return not (self._queue or self._busy) or self._thread is None or not self._thread.is_alive()

    def _hand_off_wait(self) -> None:
        """Wait (holding ``_cond``) at most ``handoff_wait_s`` for the previous message to be judged; not at all
        while detection is behind, until it has caught up (nothing queued but the message being judged)."""
        if self._behind:
            if self._queue and not self._idle():
                self.late += 1
                return
            self._behind = False
        deadline = time.monotonic() + self.handoff_wait()
        while not self._idle():
            left = deadline - time.monotonic()
            if left <= 0:
                self._behind = True
                self.late += 1
                if not self._warned_late:
                    self._warned_late = True
                    log.warning("gfservice: the detectors fall behind the training steps (a slow or hung detector?); "
                                "monitor.step() does not wait for them, stop verdicts may come late and, past %d "
                                "queued messages, reports are dropped (counted in the run's sender drops)",
                                self.queue_size)
                return
            self._cond.wait(left)

    def handoff_wait(self) -> float:
        """How long ``send`` waits for the previous verdict now: ``handoff_wait_s`` at least, more when judging
        takes longer on this machine (see :data:`HANDOFF_WAIT_FACTOR`), at most :data:`HANDOFF_WAIT_MAX_S`.

        >>> t = InProcessTransport(Aggregator())
        >>> t.handoff_wait()
        0.005
        >>> t._judge_s.extend([0.010, 0.012, 0.011, 5.0])  # one hung call does not stretch the wait
        >>> round(t.handoff_wait(), 3)
        0.048
        """
        typical = sorted(self._judge_s)[len(self._judge_s) // 2] if self._judge_s else 0.0
        return max(self.handoff_wait_s, min(HANDOFF_WAIT_MAX_S, HANDOFF_WAIT_FACTOR * typical))

    def _drop_oldest_report(self) -> None:
        """Drop the oldest queued step report (caller holds ``_cond``): layouts and ends are always delivered."""
        for i, queued in enumerate(self._queue):
            if isinstance(queued, StepReport):
                del self._queue[i]
                self.dropped += 1
                self._untold[queued.run] = self._untold.get(queued.run, 0) + 1
                return

    def _wait_idle(self) -> None:
        """Wait (holding ``_cond``) until the worker has handled every queued message, or is gone."""
        while (self._queue or self._busy) and self._thread is not None and self._thread.is_alive():
            self._cond.wait(0.5)
        while self._queue:  # the worker died (it never should): hand over what is left on this thread
            self._submit(self._queue.popleft())

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                message = self._queue.popleft()
                self._busy = True
                untold, self._untold = self._untold, {}
            for run, n in untold.items():
                self._aggregator.note_dropped(run, n)
            # let the training thread leave monitor.step() first: judging holds the GIL for a millisecond or two,
            # which would otherwise land on the call that sent the message
            t0 = time.monotonic()
            time.sleep(self._yield_s)
            try:
                self._submit(message)
            finally:
                with self._cond:
                    self._judge_s.append(time.monotonic() - t0)
                    self._busy = False
                    self._cond.notify_all()

    def _submit(self, message: Layout | StepReport | RunEnd) -> None:
        try:
            ack = self._aggregator.submit(message)
        except Exception:
            self.errors += 1
            log.exception("gfservice: the in-process aggregator failed on a message; training continues")
            return
        if not ack.accepted:
            self.rejected += 1
            log.warning("gfservice: aggregator rejected a message: %s", ack.reason)

    def flush(self) -> None:
        """Wait until every message sent so far (and held by the ``feeders``) has been merged and judged."""
        for feed in list(self.feeders):
            feed()
        with self._cond:
            self._wait_idle()

    def findings(self, run: str) -> list[Finding]:
        try:
            return self.aggregator.findings(run)
        except KeyError:
            return []

    def stop_reason(self, run: str) -> str | None:
        return self._aggregator.should_stop(run)

    def latest(self, run: str) -> StepStats | None:
        try:
            return self.aggregator.latest(run)
        except KeyError:
            return None

    def history(self, run: str) -> list[StepStats]:
        """Every merged step of ``run`` that the aggregator keeps, once the messages sent so far are judged."""
        return merged_steps(self.aggregator, run)

    def close(self) -> None:
        for feed in list(self.feeders):
            feed()
        with self._cond:
            self._wait_idle()
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._aggregator.flush()


def connect_service(service: str, run: str) -> Transport | None:
    """A transport to a running gfservice service, or ``None`` when none is reachable.

    ``service`` is ``"auto"`` (the default service, only when this process is attached to a Ray cluster or
    ``RAY_ADDRESS`` is set), or ``"NAME"`` / ``"NAMESPACE/NAME"`` of a service actor. The service token, if
    any, comes from ``$GFSERVICE_TOKEN`` or the file named by ``$GFSERVICE_SERVICE__TOKEN_FILE``.
    """
    from gfservice.config import DEFAULT_NAME, DEFAULT_NAMESPACE
    from gfservice.service.auth import TokenFileError, load_token
    from gfservice.service.ray_cluster import attach_ray, ray_reachable

    name, namespace = DEFAULT_NAME, DEFAULT_NAMESPACE
    if service != "auto":
        namespace, _, name = service.rpartition("/")
        namespace = namespace or DEFAULT_NAMESPACE
    elif not ray_reachable():
        return None
    try:
        attach_ray()
        from gfservice.service.client import find_for_run
    except (ImportError, ConnectionError) as exc:
        from gfservice.service.ray_cluster import RayAuthError

        level = logging.WARNING if isinstance(exc, RayAuthError) else logging.INFO  # a refusal is not an absence
        log.log(level, "gfservice: no Ray cluster to attach to (%s); using an in-process aggregator", exc)
        return None
    handle = find_for_run(name, namespace, run)  # the run's shard of a sharded service
    if handle is None:
        log.info("gfservice: no service %s/%s; using an in-process aggregator", namespace, name)
        return None
    try:
        token = load_token()
    except TokenFileError as exc:
        log.warning("gfservice: %s; using an in-process aggregator", exc)
        return None
    from gfservice.training.ray_sender import RaySender

    return RaySender(handle, run, token=token)
