"""What every sender of reports does, whatever carries them: the training thread only appends to a bounded queue.

:class:`QueuedSender` holds the queue (when it is full the oldest report is dropped and counted), the layouts
(kept, and sent again first whenever the other side forgot them), the drops not yet reported, and the tally of
what an answer (:class:`~gfservice.envelopes.BatchAnswer`) says: rejections, the stop verdict, layouts to send
again. A background thread runs the transport's :meth:`QueuedSender._loop`; ``flush`` and ``close`` wait for it.
The transports are :class:`~gfservice.training.ray_sender.RaySender` and
:class:`~gfservice.training.peer_sender.PeerSender`.

>>> from gfservice.envelopes import BatchAnswer
>>> from gfservice.wire import Layout, StepReport
>>> class Nowhere(QueuedSender):
...     def _loop(self) -> None:
...         pass
>>> s = Nowhere("doc", queue_size=2, batch_max=8, linger_s=0.1, thread_name="doc")
>>> s.send(Layout(run="doc", rank=0, world_size=1, layers=["w"], numel=[1], sharded=[False]))
>>> for step in range(3):
...     s.send(StepReport(run="doc", rank=0, step=step))
>>> layouts, batch, drops = s._take()
>>> len(layouts), [m.step for m in batch], drops, s.dropped
(1, [1, 2], 1, 1)
>>> s._note_answer(BatchAnswer.model_validate({"rejected": [[1, "unknown_run"]], "stop": {"doc": "nonfinite"}}),
...                n_layouts=1)
>>> s.rejected, s.dropped, s.stop_reason("doc"), s._resend_layouts
({'unknown_run': 1}, 2, 'nonfinite', True)
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from gfservice.envelopes import BatchAnswer
from gfservice.training.transport import TransportBase
from gfservice.wire import Layout, RejectReason, RunEnd, StepReport

__all__ = ["QueuedSender"]

log = logging.getLogger(__name__)


def _urgent(report: StepReport) -> bool:
    """A report with NaN/Inf gradients: it goes out at once rather than after ``linger_s``."""
    bad = report.stats.get("nonfinite")
    return report.local_nonfinite or (bad is not None and bool(bad.any()))


class QueuedSender(TransportBase):
    """The queue, the bookkeeping and the thread of a sender; a subclass adds its transport in :meth:`_loop`
    (and calls this ``__init__`` last: it starts the thread).

    ``dropped`` counts the reports lost so far (dropped from the queue, undelivered or rejected), ``sent`` those
    handed to the transport, ``rejected`` the rejections by reason.
    """

    #: Whether layouts count as reports in ``sent`` and ``dropped`` (the Ray path always counted them).
    layouts_are_reports = False

    def __init__(self, run: str, *, queue_size: int, batch_max: int, linger_s: float, thread_name: str,
                 join_timeout_s: float = 15.0):
        self.run = run
        self.queue_size = queue_size
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.join_timeout_s = join_timeout_s
        self.dropped = 0
        self.sent = 0
        self.rejected: dict[str, int] = {}
        self._unreported = 0  # drops not yet told to the other side
        self._queue: deque[StepReport | RunEnd] = deque()
        self._layouts: list[Layout] = []
        self._resend_layouts = False
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False  # a batch is taken, not yet handed over
        self._stop_reason: str | None = None
        self._warned_unauthorized = False
        self._thread = threading.Thread(target=self._loop, name=thread_name, daemon=True)
        self._thread.start()

    # ---- the training thread's side: append and return ------------------------------------------
    def send(self, message: Layout | StepReport | RunEnd) -> None:
        with self._cond:
            if isinstance(message, Layout):  # kept, and sent first on the next batch (and whenever forgotten)
                self._layouts.append(message)
                self._resend_layouts = True
                self._cond.notify()
                return
            if len(self._queue) >= self.queue_size:
                self._queue.popleft()
                self._lose(1)
            self._queue.append(message)
            # Waking the sender costs more than the append: only for a full batch, or what must not wait.
            if len(self._queue) >= self.batch_max or not isinstance(message, StepReport) or _urgent(message):
                self._cond.notify()

    def _lose(self, n: int) -> None:
        """Count ``n`` reports that will not reach the other side (caller holds ``_cond``)."""
        self.dropped += n
        self._unreported += n

    # ---- the sender thread's side ---------------------------------------------------------------
    def _loop(self) -> None:
        raise NotImplementedError

    def _wait_for_work(self) -> bool:
        """Wait up to ``linger_s`` unless a batch is ready; returns whether the sender is closing."""
        with self._cond:
            if len(self._queue) < self.batch_max and not self._closing and not self._resend_layouts:
                self._cond.wait(self.linger_s)
            return self._closing

    def _drained(self) -> bool:
        with self._cond:
            return not self._queue and not self._resend_layouts

    def _take(self) -> tuple[list[Layout], list[StepReport | RunEnd], int]:
        """The next batch: the layouts when they are due, up to ``batch_max`` reports, and the drops to report."""
        with self._cond:
            batch = [self._queue.popleft() for _ in range(min(self.batch_max, len(self._queue)))]
            layouts = list(self._layouts) if self._resend_layouts else []
            self._resend_layouts = False
            drops, self._unreported = self._unreported, 0
            self._busy = bool(batch or layouts)
            return layouts, batch, drops

    def _handed_over(self, layouts: list[Layout], batch: list[StepReport | RunEnd]) -> None:
        """The batch is with the transport."""
        with self._cond:
            self.sent += len(batch) + (len(layouts) if self.layouts_are_reports else 0)
            self._busy = False

    def _undelivered(self, layouts: list[Layout], batch: list[StepReport | RunEnd], drops: int) -> None:
        """The batch did not get through: its reports are lost, its drops reported next time, its layouts due."""
        with self._cond:
            self._lose(len(batch) + (len(layouts) if self.layouts_are_reports else 0))
            self._unreported += drops
            self._resend_layouts = self._resend_layouts or bool(layouts)
            self._busy = False

    def _note_answer(self, answer: BatchAnswer, n_layouts: int) -> None:
        """Take in what the answer to a batch that began with ``n_layouts`` layouts says."""
        stop = answer.stop_reason(self.run)
        if stop:
            self._stop_reason = stop
        first_report = 0 if self.layouts_are_reports else n_layouts
        lost = 0
        for index, reason in answer.rejected:
            self.rejected[reason.value] = self.rejected.get(reason.value, 0) + 1
            lost += index >= first_report  # a rejected report is a lost one
        if self.rejected.get(RejectReason.unauthorized.value) and not self._warned_unauthorized:
            self._warned_unauthorized = True
            log.warning("gfservice: the service refused this job's reports (unauthorized): it has a token; set "
                        "GFSERVICE_TOKEN (or GFSERVICE_SERVICE__TOKEN_FILE) in the training workers' environment")
        with self._cond:
            if lost:
                self._lose(lost)
            if answer.resend_layout:
                self._resend_layouts = True

    def _idle(self) -> bool:
        """Whether the transport has nothing of ours outstanding."""
        return True

    def _hopeless(self) -> bool:
        """Whether waiting cannot help (nothing will be delivered)."""
        return False

    # ---- queries and the end ----------------------------------------------------------------------
    def stop_reason(self, run: str) -> str | None:
        return self._stop_reason if run == self.run else None

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued has been delivered (or ``timeout_s``); True when it was."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                done = not self._queue and not self._busy and not self._resend_layouts and self._idle()
                self._cond.notify()
            if done:
                return True
            if self._hopeless():
                return False
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=self.join_timeout_s)
