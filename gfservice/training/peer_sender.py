"""torchrun and Slurm without Ray: every rank ships its reports to rank 0, which aggregates the job.

When a process group is initialised (``world_size > 1``) and no service is reachable, :func:`connect_peers`
makes rank 0 host the job's aggregator, ``/metrics`` and its discovery entry
(:class:`~gfservice.service.peer_server.PeerHost`, once per process) and publish ``host:port`` in the process
group's store (a key-value store on its own TCP connection, not a collective); every rank, rank 0 included,
sends to it through a :class:`PeerSender`. The training thread only appends to a bounded queue; a background
thread connects (reading the address from the store when it appears), ships batches, and drops the oldest
report when the queue is full, counting it, as :class:`~gfservice.training.ray_sender.RaySender` does. The
answers bring the stop verdict and the findings back, so ``monitor.should_stop`` and ``monitor.findings`` work
on every rank without waiting. If rank 0 goes away, the others keep training: their reports drop and count.

>>> import torch
>>> from gfservice.service.aggregator import Aggregator
>>> from gfservice.service.peer_server import PeerServer
>>> server = PeerServer(Aggregator())
>>> sender = PeerSender("doc-peer", lambda: server.address)
>>> from gfservice.wire import Layout, StepReport
>>> sender.send(Layout(run="doc-peer", rank=0, world_size=1, layers=["w"], numel=[1], sharded=[False]))
>>> sender.send(StepReport(run="doc-peer", rank=0, step=0, loss=float("nan"),
...                        stats={"count": [1], "sum_sq": [1.0], "max_abs": [1.0], "nonfinite": [0]}))
>>> sender.flush(), sender.dropped
(True, 0)
>>> sender.close()
>>> [f.detector for f in sender.findings("doc-peer")], sender.stop_reason("doc-peer")
(['nonfinite'], None)
>>> server.close()
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from gfservice.api import Finding, StepStats
from gfservice.config import Settings
from gfservice.service.aggregator import Aggregator
from gfservice.service.auth import load_token
from gfservice.service.peer_server import FrameError, PeerHost, encode_frame, hello, read_frame
from gfservice.training.transport import TransportBase
from gfservice.wire import Layout, RejectReason, RunEnd, StepReport

__all__ = ["PeerSender", "connect_peers", "peer_host"]

log = logging.getLogger(__name__)

#: Rejections that mean "rank 0 does not know us (any more)": the layout is sent again.
_RESEND_LAYOUT = {RejectReason.unknown_run.value, RejectReason.unknown_rank.value}
#: The store key under which rank 0 publishes ``host:port`` ("" when it hosts nothing), per attempt.
STORE_KEY = "gfservice/peer/{attempt}"


def _urgent(report: StepReport) -> bool:
    """A report with NaN/Inf gradients: it goes out at once rather than after ``linger_s``."""
    bad = report.stats.get("nonfinite")
    return report.local_nonfinite or (bad is not None and bool(bad.any()))


class PeerSender(TransportBase):
    """A :class:`~gfservice.training.transport.Transport` to rank 0's peer server at ``address()``.

    ``address`` is called on the sender thread until it returns ``host:port`` (``None``: not known yet; ``""``:
    there is none, give up). ``aggregator``: rank 0's own, read directly for ``findings`` and ``latest``.
    """

    def __init__(self, run: str, address: Callable[[], str | None], token: str | None = None,
                 aggregator: Aggregator | None = None, queue_size: int = 256, batch_max: int = 32,
                 linger_s: float = 0.1, poll_s: float = 0.5, timeout_s: float = 10.0):
        self.run = run
        self._address = address
        self.token = token
        self.aggregator = aggregator
        self.queue_size = queue_size
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.dropped = 0  # reports lost so far: dropped from the queue, undelivered or rejected
        self.sent = 0
        self.rejected: dict[str, int] = {}
        self._unreported = 0  # drops not yet told to rank 0
        self._queue: deque[StepReport | RunEnd] = deque()
        self._layouts: list[Layout] = []
        self._resend_layouts = False
        self._cond = threading.Condition()
        self._closing = False
        self._busy = False  # a batch is out, its answer not yet in
        self._sock: socket.socket | None = None
        self._gave_up = False
        self._unreachable = False  # the last try to connect failed
        self._last_exchange = 0.0
        self._retry_at = 0.0
        self._stop_reason: str | None = None
        self._findings: list[Finding] = []
        self._thread = threading.Thread(target=self._loop, name=f"gfservice-peer-{run}", daemon=True)
        self._thread.start()

    # ---- the training thread's side: append and return ------------------------------------------
    def send(self, message: Layout | StepReport | RunEnd) -> None:
        with self._cond:
            if isinstance(message, Layout):  # kept, and sent first on every connection
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
        """Count ``n`` reports that will not reach rank 0 (caller holds ``_cond``)."""
        self.dropped += n
        self._unreported += n

    # ---- the sender thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                if len(self._queue) < self.batch_max and not self._closing and not self._resend_layouts:
                    self._cond.wait(self.linger_s)
                closing = self._closing
            if self._sock is None and not self._connect():
                with self._cond:
                    if closing or self._gave_up:  # nowhere to send: what is queued is lost
                        self._lose(len(self._queue))
                        self._queue.clear()
                    if closing:
                        break
                    self._cond.wait(0.1)
                continue
            with self._cond:
                batch: list[Any] = [self._queue.popleft() for _ in range(min(self.batch_max, len(self._queue)))]
                layouts = list(self._layouts) if self._resend_layouts else []
                self._resend_layouts = False
                self._busy = bool(batch or layouts)
            if batch or layouts or time.monotonic() - self._last_exchange >= self.poll_s:
                self._exchange(layouts, batch)
            with self._cond:
                self._busy = False
                if closing and not self._queue:
                    break
        self._disconnect()

    def _connect(self) -> bool:
        if self._gave_up or time.monotonic() < self._retry_at:
            return False
        self._retry_at = time.monotonic() + 0.1  # until rank 0 has published its address: a cheap store check
        try:
            address = self._address()
        except Exception as exc:
            log.debug("gfservice: peer address not readable yet: %s", exc)
            return False
        if address is None:
            self._unreachable = True
            return False
        self._retry_at = time.monotonic() + 1.0  # a connection refused or timed out: try again in a second
        if not address:
            self._give_up("rank 0 hosts no aggregator")
            return False
        host, _, port = address.rpartition(":")
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(encode_frame(hello(self.token)))
            answer = read_frame(sock, 4096)
        except (OSError, EOFError, FrameError, ValueError) as exc:
            log.info("gfservice: cannot reach rank 0's aggregator at %s (%s); retrying", address, exc)
            self._unreachable = True
            return False
        if not (isinstance(answer, dict) and answer.get("ok") is True):
            sock.close()
            self._give_up(f"rank 0's aggregator at {address} refused this rank: {answer.get('error', answer)}"
                          if isinstance(answer, dict) else "bad hello answer")
            return False
        self._sock = sock
        self._unreachable = False
        with self._cond:
            self._resend_layouts = True  # a new connection may be a new rank 0: it learns our layout first
        return True

    def _give_up(self, why: str) -> None:
        self._gave_up = True
        log.warning("gfservice: %s; this rank's reports are dropped and counted", why)

    def _disconnect(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def _exchange(self, layouts: list[Layout], batch: list[StepReport | RunEnd]) -> None:
        assert self._sock is not None
        with self._cond:
            drops, self._unreported = self._unreported, 0
        try:
            frame = encode_frame({"run": self.run, "messages": [m.model_dump() for m in (*layouts, *batch)],
                                  "dropped": drops})
        except (FrameError, ValueError, TypeError) as exc:  # a bug or an oversized batch, not the connection
            log.warning("gfservice: could not encode %d reports for rank 0 (%s); dropped", len(batch), exc)
            with self._cond:
                self._lose(len(batch))
                self._unreported += drops
            return
        try:
            self._sock.sendall(frame)
            answer = read_frame(self._sock)
        except (OSError, EOFError, FrameError, ValueError) as exc:
            log.info("gfservice: lost the connection to rank 0's aggregator (%s); %d reports dropped", exc,
                     len(batch))
            self._disconnect()
            with self._cond:
                self._lose(len(batch))
                self._unreported += drops
                self._resend_layouts = self._resend_layouts or bool(layouts)
            return
        self._last_exchange = time.monotonic()
        self.sent += len(batch)
        self._on_answer(answer, len(layouts))

    def _on_answer(self, answer: Any, n_layouts: int) -> None:
        if not isinstance(answer, dict):
            return
        if answer.get("stop"):
            self._stop_reason = str(answer["stop"])
        if isinstance(answer.get("findings"), list):
            try:
                self._findings = [Finding.model_validate(f) for f in answer["findings"]]
            except ValueError:
                log.debug("gfservice: unreadable findings from rank 0", exc_info=True)
        lost = 0
        for index, reason in answer.get("rejected", []):
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
            if reason in _RESEND_LAYOUT:
                with self._cond:
                    self._resend_layouts = True
            lost += index >= n_layouts  # a rejected report is a lost one
        if lost:
            with self._cond:
                self._lose(lost)

    # ---- queries: answered from what rank 0 pushed (or, on rank 0, its aggregator); never block --------
    def findings(self, run: str) -> list[Finding]:
        if self.aggregator is not None:
            try:
                return self.aggregator.findings(run)
            except KeyError:
                return []
        return list(self._findings) if run == self.run else []

    def stop_reason(self, run: str) -> str | None:
        return self._stop_reason if run == self.run else None

    def latest(self, run: str) -> StepStats | None:
        if self.aggregator is None:
            return None  # only rank 0 holds the merged steps
        try:
            return self.aggregator.latest(run)
        except KeyError:
            return None

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued has been answered by rank 0 (or ``timeout_s``); True when it was."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                done = not self._queue and not self._busy and not self._resend_layouts
                self._cond.notify()
            if done:
                return True
            if self._gave_up or (self._sock is None and self._unreachable):
                return False
            time.sleep(0.01)
        return False

    def close(self) -> None:
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout=self.timeout_s + 5)


# ---- choosing rank 0 and finding it -----------------------------------------------------------------
_HOST: PeerHost | None = None
_HOST_LOCK = threading.Lock()


def peer_host() -> PeerHost | None:
    """Rank 0's :class:`~gfservice.service.peer_server.PeerHost` in this process, if it hosts one."""
    return _HOST


def _start_host(settings: Settings, token: str | None) -> PeerHost:
    global _HOST
    with _HOST_LOCK:
        if _HOST is None:
            _HOST = PeerHost(settings, bind=bind_address(), token=token, tag=f"{socket.gethostname()}-{os.getpid()}")
            atexit.register(_HOST.close)
        return _HOST


def bind_address() -> str:
    """Where rank 0 listens: ``$GFSERVICE_PEER_ADDR`` when set; else loopback when the whole job is on this node
    (``LOCAL_WORLD_SIZE`` covers the world, or Slurm's ``SLURM_NNODES`` is 1); else the address of
    ``MASTER_ADDR`` (rank 0's node, as torchrun and Slurm scripts set it), else of this host's name."""
    if os.environ.get("GFSERVICE_PEER_ADDR"):
        return os.environ["GFSERVICE_PEER_ADDR"]
    world = torch.distributed.get_world_size()
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    one_node = int(local) >= world if local.isdigit() else os.environ.get("SLURM_NNODES", "1") == "1"
    if one_node:
        return "127.0.0.1"
    return socket.gethostbyname(os.environ.get("MASTER_ADDR") or socket.gethostname())


def _store_reader(store: Any, key: str) -> Callable[[], str | None]:
    """A non-blocking read of ``key``: ``None`` until rank 0 has published it."""

    def read() -> str | None:
        if not store.check([key]):
            return None
        return bytes(store.get(key)).decode()

    return read


def connect_peers(run: str, attempt: str, settings: Settings) -> PeerSender | None:
    """This rank's transport to rank 0's aggregator (starting it on rank 0), or ``None`` when rank 0 cannot
    host one (then rank 0 falls back to an aggregator of its own and the other ranks drop their reports)."""
    from torch.distributed import distributed_c10d as c10d

    rank = torch.distributed.get_rank()
    token = load_token(settings.service.token_file)  # $GFSERVICE_TOKEN, else the token file: as the service
    store = c10d._get_default_store()
    key = STORE_KEY.format(attempt=attempt)
    if rank == 0:
        try:
            host = _start_host(settings, token)
        except Exception as exc:
            log.warning("gfservice: rank 0 cannot host the job's aggregator (%s); each rank keeps its own", exc)
            store.set(key, "")
            return None
        store.set(key, host.server.address)
        address = host.server.address
        return PeerSender(run, lambda: address, token, aggregator=host.aggregator)
    with contextlib.suppress(Exception):  # a client of its own: the sender never waits on the training thread's
        store = store.clone()  # type: ignore[attr-defined]  # Store.clone exists (torch 2.2+) but is not typed
    return PeerSender(run, _store_reader(store, key), token)
