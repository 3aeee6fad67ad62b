"""A small worker that ships a monitor's messages off the training thread, woken by time rather than by the caller.

Waking another thread from the training thread costs it 0.1-0.2 ms on a busy machine (the woken thread takes
its core); :meth:`Shipper.put` only appends to a queue, and the worker looks at the queue every few
milliseconds (a quarter of the time between puts, 0.5 to 20 ms) while work comes, and sleeps until the next put
after a second without any. Past ``limit`` queued jobs the oldest droppable one is dropped (counted in
``dropped``): :meth:`put` never blocks.

>>> done = []
>>> s = Shipper(lambda e: None)
>>> for i in range(3):
...     s.put(lambda i=i: done.append(i))
>>> s.wait(1.0), done, s.pending
(True, [0, 1, 2], 0)
>>> s.close()
True
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

#: Bounds of the worker's look at its queue, seconds.
POLL_MIN_S = 0.0005
POLL_MAX_S = 0.02
#: Seconds without a put after which the worker sleeps until the next one.
IDLE_S = 1.0


class Shipper:
    """Runs the jobs it is given, in order, on its own daemon thread. ``on_error(where)`` is called (on that
    thread) when a job raises; the worker goes on."""

    def __init__(self, on_error: Callable[[str], None], name: str = "gfservice-shipper", limit: int = 64):
        self._on_error = on_error
        self._name = name
        self.limit = max(1, limit)
        self._queue: deque[tuple[Callable[[], None], bool]] = deque()
        self._lock = threading.Lock()  # the queue's changes (a drop scans it while the worker pops)
        self._handed = 0
        self._done = 0
        #: Jobs dropped because the queue was full.
        self.dropped = 0
        self._asleep = False
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._last_put = time.monotonic()
        self._poll_s = POLL_MAX_S

    @property
    def pending(self) -> int:
        """Jobs handed over and not finished yet."""
        return self._handed - self._done

    def put(self, job: Callable[[], None], droppable: bool = True) -> None:
        """Queue ``job``; never blocks (past ``limit`` queued, the oldest droppable job goes)."""
        now = time.monotonic()
        self._poll_s = min(POLL_MAX_S, max(POLL_MIN_S, 0.25 * (now - self._last_put)))
        self._last_put = now
        queue = self._queue
        with self._lock:
            if len(queue) >= self.limit:
                for i, (_, drop) in enumerate(queue):
                    if drop:
                        del queue[i]
                        self._done += 1
                        self.dropped += 1
                        break
            queue.append((job, droppable))
            self._handed += 1
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        elif self._asleep:
            self._wake.set()

    def _loop(self) -> None:
        queue = self._queue
        while True:
            if queue:
                with self._lock:
                    job, _ = queue.popleft()
                try:
                    job()
                except Exception:
                    self._on_error("shipping a step")
                finally:
                    with self._lock:
                        self._done += 1
                continue
            if self._closed:
                return
            if time.monotonic() - self._last_put < IDLE_S:
                time.sleep(self._poll_s)
                continue
            self._asleep = True
            if not queue and not self._closed:  # a put after this line sees _asleep and wakes us
                self._wake.wait(IDLE_S)
            self._wake.clear()
            self._asleep = False

    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` seconds for every job handed over so far; whether they are done."""
        if not self.pending:
            return True
        if self._thread is None or not self._thread.is_alive() or threading.current_thread() is self._thread:
            return False
        self._wake.set()
        deadline = time.monotonic() + timeout
        pause = 0.0001
        while self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(pause, left))
            pause = min(2 * pause, 0.005)
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Finish the queued jobs (at most ``timeout`` seconds) and stop the worker; whether all were done."""
        done = self.wait(timeout)
        self._closed = True
        self._wake.set()
        return done
