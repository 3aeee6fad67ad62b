"""torchrun and Slurm without Ray: every rank ships its reports to rank 0, which aggregates the job.

When a process group is initialised (``world_size > 1``) and no service is reachable, :func:`connect_peers`
makes rank 0 host the job's aggregator, ``/metrics`` and its discovery entry
(:class:`~gfservice.hosting.peer_host.PeerHost`, once per process), make a secret for the attempt, and publish
``host:port`` and the secret in the process group's store (the job's own rendezvous, a key-value store on its own
TCP connection, not a collective); every rank, rank 0 included, sends to it through a :class:`PeerSender`, which
proves it holds the secret on every connection (see :mod:`gfservice.service.peer_server`). The training thread
only appends to a bounded queue (:class:`~gfservice.training.sending.QueuedSender`, as for
:class:`~gfservice.training.ray_sender.RaySender`); a background thread connects (reading the address from the
store when it appears) and ships batches. The answers bring the stop verdict and the findings back, so
``monitor.should_stop`` and ``monitor.findings`` work on every rank without waiting. If rank 0 goes away, the
others keep training: their reports drop and count. A sender told ``stale_attempt`` re-registers (its layouts,
under the next :func:`~gfservice.service.peer_server.derived_attempt`, the same on every rank) rather than go
silent. A job that merges on its nodes (from
:data:`~gfservice.training.ray_sender.AGENT_MIN_WORLD` ranks, or ``$GFSERVICE_MERGE_AGENT=1``) sends to its node's
local rank 0 instead, which merges the node and sends to rank 0 (:mod:`gfservice.hosting.node_merger`).

>>> import torch
>>> from gfservice.service.aggregator import Aggregator
>>> from gfservice.service.peer_server import PeerServer
>>> server = PeerServer(Aggregator())
>>> _ = server.admit("doc-peer", "a1", world_size=1, secret="s3cret")
>>> sender = PeerSender("doc-peer", 0, "a1", lambda: (server.address, "s3cret"))
>>> from gfservice.wire import Layout, StepReport
>>> sender.send(Layout(run="doc-peer", rank=0, world_size=1, layers=["w"], numel=[1], sharded=[False],
...                    attempt="a1"))
>>> sender.send(StepReport(run="doc-peer", rank=0, step=0, loss=float("nan"), attempt="a1",
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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from pydantic import ValidationError

from gfservice.api import Finding, StepStats
from gfservice.config import Settings
from gfservice.envelopes import Batch, BatchAnswer
from gfservice.service.aggregator import Aggregator
from gfservice.service.auth import load_token, new_job_secret, peer_key
from gfservice.service.peer_protocol import (
    MAX_REREGISTER,
    FrameError,
    HandshakeError,
    derived_attempt,
    encode_frame,
    handshake,
    read_frame,
)
from gfservice.training.sending import QueuedSender
from gfservice.wire import Layout, RejectReason, RunEnd, StepReport

if TYPE_CHECKING:
    from gfservice.hosting.node_merger import NodeHost
    from gfservice.hosting.peer_host import PeerHost

__all__ = ["PeerSender", "connect_peers", "peer_host"]

#: The longest ``history()`` on rank 0 waits for its own queued reports to reach its aggregator, seconds.
HISTORY_FLUSH_S = 5.0

log = logging.getLogger(__name__)
#: The store key under which rank 0 publishes ``host:port`` ("" when it hosts nothing), per run and attempt (a job
#: may monitor several runs one after another under one attempt: a rank must not find the previous run's address
#: before rank 0 has admitted the next run).
STORE_KEY = "gfservice/peer/{run}/{attempt}"
#: The store key under which rank 0 publishes the attempt's secret (before the address).
SECRET_KEY = "gfservice/peer/{run}/{attempt}/secret"
#: The store key under which a node's local rank 0 publishes its node merger's ``host:port``, per attempt (its
#: secret under the same key + ``/secret``).
NODE_KEY = "gfservice/node/{first}/{run}/{attempt}"
#: Refusals in a row after which a rank stops trying (a server that is not its job's, or a token that differs).
MAX_REFUSALS = 5
#: ``(host:port, secret)`` of rank 0's server; ``None`` while not known yet, ``("", "")`` when there is none.
Rendezvous = Callable[[], "tuple[str, str] | None"]


class PeerSender(QueuedSender):
    """A :class:`~gfservice.training.transport.Transport` to rank 0's peer server, as ``rank`` of ``attempt``.

    ``rendezvous`` is called on the sender thread until it returns ``(host:port, secret)`` (``None``: not known
    yet; an empty address: there is none, give up). ``token``: ``$GFSERVICE_TOKEN``, bound into the key when set.
    ``aggregator``: rank 0's own, read directly for ``findings`` and ``latest``; ``on_layout``: told of every
    layout this rank sends (rank 0 raises its server's frame limit from its own layout). ``node``: a node
    merger's sender speaks for the ``node`` ranks from ``rank`` on (see :mod:`gfservice.hosting.node_merger`);
    ``on_answer``: told of every answer (the node merger takes its verdicts from them).
    """

    def __init__(self, run: str, rank: int, attempt: str, rendezvous: Rendezvous, token: str | None = None,
                 aggregator: Aggregator | None = None, queue_size: int = 256, batch_max: int = 32,
                 linger_s: float = 0.1, poll_s: float = 0.5, timeout_s: float = 10.0,
                 on_layout: Callable[[Layout], None] | None = None, node: int = 1,
                 on_answer: Callable[[BatchAnswer], None] | None = None):
        self._rendezvous = rendezvous
        self.node = node
        self._on_answer = on_answer
        self.rank = rank
        self.attempt = attempt
        self.token = token
        self.aggregator = aggregator
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        #: Times this rank re-registered after ``stale_attempt`` (its attempt is then ``derived_attempt(...)``).
        self.reregistered = 0
        self._on_layout = on_layout
        self._sock: socket.socket | None = None
        self._gave_up = False
        self._unreachable = False  # the last try to connect failed
        self._refusals = 0
        self._last_exchange = 0.0
        self._retry_at = 0.0
        self._findings: list[Finding] = []
        super().__init__(run, queue_size=queue_size, batch_max=batch_max, linger_s=linger_s,
                         thread_name=f"gfservice-peer-{run}", join_timeout_s=timeout_s + 5)

    def send(self, message: Layout | StepReport | RunEnd) -> None:
        if isinstance(message, Layout) and self._on_layout is not None:
            try:
                self._on_layout(message)
            except Exception:  # a limit not raised costs a reconnect, never the training loop
                log.debug("gfservice: on_layout failed", exc_info=True)
        super().send(message)

    # ---- the sender thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            closing = self._wait_for_work()
            if self._sock is None and not self._connect():
                with self._cond:
                    if closing or self._gave_up:  # nowhere to send: what is queued is lost
                        self._lose(len(self._queue))
                        self._queue.clear()
                    if closing:
                        break
                    self._cond.wait(0.1)
                continue
            layouts, batch, drops = self._take()
            if batch or layouts or drops or time.monotonic() - self._last_exchange >= self.poll_s:
                self._exchange(layouts, batch, drops)
            if closing and self._drained():
                break
        self._disconnect()

    def _connect(self) -> bool:
        if self._gave_up or time.monotonic() < self._retry_at:
            return False
        self._retry_at = time.monotonic() + 0.1  # until rank 0 has published its address: a cheap store check
        try:
            found = self._rendezvous()
        except Exception as exc:
            log.debug("gfservice: peer address not readable yet: %s", exc)
            return False
        if found is None:
            self._unreachable = True
            return False
        address, secret = found
        self._retry_at = time.monotonic() + 1.0  # a connection refused or timed out: try again in a second
        if not address:
            self._give_up("rank 0 hosts no aggregator")
            return False
        host, _, port = address.rpartition(":")
        sock = None
        try:
            sock = socket.create_connection((host.strip("[]"), int(port)), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handshake(sock, peer_key(secret, self.token), self.run, self.rank, self.attempt, self.timeout_s,
                      node=self.node)
        except HandshakeError as exc:
            if sock is not None:
                sock.close()
            self._refusals += 1
            self._unreachable = True
            if self._refusals >= MAX_REFUSALS:
                self._give_up(f"rank 0's aggregator at {address} refused this rank: {exc}")
            else:
                log.info("gfservice: rank 0's aggregator at %s refused this rank (%s); retrying", address, exc)
            return False
        except (OSError, EOFError, FrameError, ValueError) as exc:
            if sock is not None:
                sock.close()
            log.info("gfservice: cannot reach rank 0's aggregator at %s (%s); retrying", address, exc)
            self._unreachable = True
            return False
        sock.settimeout(self.timeout_s)
        self._sock = sock
        self._unreachable = False
        self._refusals = 0
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

    def _wire(self, message: Layout | StepReport | RunEnd) -> dict[str, Any]:
        """``message`` as it travels: under the attempt this rank re-registered as, if it did."""
        plain = message.model_dump()
        if self.reregistered:
            plain["attempt"] = derived_attempt(plain.get("attempt", ""), self.reregistered)
        return plain

    def _exchange(self, layouts: list[Layout], batch: list[StepReport | RunEnd], drops: int) -> None:
        assert self._sock is not None
        try:
            out = Batch(run=self.run, messages=[self._wire(m) for m in (*layouts, *batch)], dropped=drops)
            frame = encode_frame(out.model_dump())
        except (FrameError, ValueError, TypeError) as exc:  # a bug or an oversized batch, not the connection
            log.warning("gfservice: could not encode %d reports for rank 0 (%s); dropped", len(batch), exc)
            self._undelivered(layouts, batch, drops)
            return
        try:
            self._sock.sendall(frame)
            raw = read_frame(self._sock)
        except (OSError, EOFError, FrameError, ValueError) as exc:
            log.info("gfservice: lost the connection to rank 0's aggregator (%s); %d reports dropped", exc,
                     len(batch))
            self._disconnect()
            self._undelivered(layouts, batch, drops)
            return
        self._last_exchange = time.monotonic()
        try:
            answer = BatchAnswer.model_validate(raw)
        except ValidationError:
            log.debug("gfservice: unreadable answer from rank 0", exc_info=True)
        else:
            if answer.findings is not None:
                self._findings = answer.findings
            self._note_answer(answer, len(layouts))
            if self._on_answer is not None:
                try:
                    self._on_answer(answer)
                except Exception:
                    log.debug("gfservice: on_answer failed", exc_info=True)
            if any(reason is RejectReason.stale_attempt for _, reason in answer.rejected):
                self._reregister()
        self._handed_over(layouts, batch)

    def pass_on_drops(self, n: int) -> None:
        """Report ``n`` reports that others dropped (a node merger passes its ranks' drops on) with the next batch."""
        with self._cond:
            self._unreported += n

    def _reregister(self) -> None:
        """Told ``stale_attempt``: another attempt of the run took over in rank 0's aggregator. Register again
        under the next derived attempt (every rank derives the same), up to ``MAX_REREGISTER`` times."""
        if self.reregistered >= MAX_REREGISTER:
            return
        self.reregistered += 1
        log.warning("gfservice: rank 0's aggregator says this rank's attempt of %s is stale; registering again as "
                    "attempt %s", self.run, derived_attempt(self.attempt, self.reregistered))
        with self._cond:
            self._resend_layouts = True
            self._stop_reason = None  # the verdict of the attempt that took over is not this job's

    def _hopeless(self) -> bool:
        return self._gave_up or (self._sock is None and self._unreachable)

    # ---- queries: answered from what rank 0 pushed (or, on rank 0, its aggregator); never block --------
    def findings(self, run: str) -> list[Finding]:
        if self.aggregator is not None:
            try:
                return self.aggregator.findings(run)
            except KeyError:
                return []
        return list(self._findings) if run == self.run else []

    def history(self, run: str) -> list[StepStats]:
        """On rank 0, its aggregator's merged steps once this rank's own queued reports reached it (at most
        :data:`HISTORY_FLUSH_S`: they travel over the socket like every rank's); [] elsewhere."""
        if self.aggregator is None:
            return []
        self.flush(HISTORY_FLUSH_S)
        return super().history(run)

    def latest(self, run: str) -> StepStats | None:
        if self.aggregator is None:
            return None  # only rank 0 holds the merged steps
        try:
            return self.aggregator.latest(run)
        except KeyError:
            return None


# ---- choosing rank 0 and finding it -----------------------------------------------------------------
_HOST: PeerHost | None = None
_HOST_LOCK = threading.Lock()


def peer_host() -> PeerHost | None:
    """Rank 0's :class:`~gfservice.hosting.peer_host.PeerHost` in this process, if it hosts one."""
    return _HOST


def _start_host(settings: Settings, token: str | None) -> PeerHost:
    global _HOST
    from gfservice.hosting.peer_host import PeerHost  # /metrics and discovery: only where rank 0 hosts

    with _HOST_LOCK:
        if _HOST is None:
            _HOST = PeerHost(settings, bind=bind_address(), token=token, tag=f"{socket.gethostname()}-{os.getpid()}")
            atexit.register(_HOST.close)
        return _HOST


_NODE: NodeHost | None = None


def _start_node_host(settings: Settings, token: str | None) -> NodeHost:
    """This process's node merger (local rank 0), started once; its held steps go on at exit."""
    global _NODE
    from gfservice.hosting.node_merger import NodeHost

    with _HOST_LOCK:
        if _NODE is None:
            wait_s = min(1.0, settings.aggregator.merge_timeout_s / 2)
            _NODE = NodeHost(token, wait_s=wait_s, tick_interval_s=settings.service.tick_interval_s)
            atexit.register(_NODE.close)
        return _NODE


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


def _store_reader(store: Any, address_key: str, secret_key: str) -> Rendezvous:
    """A non-blocking read of a server's address and secret: ``None`` until they are published."""

    def read() -> tuple[str, str] | None:
        if not store.check([address_key]):
            return None
        address = bytes(store.get(address_key)).decode()
        if not address:
            return "", ""
        return address, bytes(store.get(secret_key)).decode()

    return read


def connect_peers(run: str, attempt: str, settings: Settings) -> PeerSender | None:
    """This rank's transport to rank 0's aggregator (starting it on rank 0), or ``None`` when rank 0 cannot
    host one (then rank 0 falls back to an aggregator of its own and the other ranks drop their reports).
    In a job that merges on its nodes (:func:`~gfservice.hosting.node_merger.merges_on_nodes`), the transport
    to its node's merger instead (starting it on the node's local rank 0)."""
    from torch.distributed import distributed_c10d as c10d

    from gfservice.hosting.node_merger import merges_on_nodes, node_ranks

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    token = load_token(settings.service.token_file)  # $GFSERVICE_TOKEN, else the token file: as the service
    store = c10d._get_default_store()
    node = node_ranks(rank, world)
    on_nodes = merges_on_nodes(world, node)
    to_rank_0: Rendezvous
    aggregator: Aggregator | None = None
    own_layout: Callable[[Layout], None] | None = None
    if rank == 0:
        try:
            host = _start_host(settings, token)
        except Exception as exc:
            log.warning("gfservice: rank 0 cannot host the job's aggregator (%s); each rank keeps its own", exc)
            store.set(STORE_KEY.format(run=run, attempt=attempt), "")
            return None
        secret = new_job_secret()
        host.server.admit(run, attempt, world, secret, node_size=len(node) if on_nodes and node else 1)
        # the secret first: the address says "ready"
        store.set(SECRET_KEY.format(run=run, attempt=attempt), secret)
        store.set(STORE_KEY.format(run=run, attempt=attempt), host.server.address)
        address, server, aggregator = host.server.address, host.server, host.aggregator

        def own_layout(layout: Layout) -> None:
            server.expect_layout(run, attempt, len(layout.layers), len(layout.model_dump_json()))

        def to_rank_0() -> tuple[str, str]:
            return address, secret

        if not on_nodes:
            return PeerSender(run, rank, attempt, to_rank_0, token, aggregator=aggregator, on_layout=own_layout)
    with contextlib.suppress(Exception):  # a client of its own: the sender never waits on the training thread's
        store = store.clone()  # type: ignore[attr-defined]  # Store.clone exists (torch 2.2+) but is not typed
    if rank != 0:
        to_rank_0 = _store_reader(store, STORE_KEY.format(run=run, attempt=attempt),
                                  SECRET_KEY.format(run=run, attempt=attempt))
    if not on_nodes or node is None:
        return PeerSender(run, rank, attempt, to_rank_0, token)
    node_key = NODE_KEY.format(first=node.start, run=run, attempt=attempt)
    if rank == node.start:  # the node's local rank 0: its merger, and its sender to rank 0 for the node
        merger = _start_node_host(settings, token)
        node_secret = new_job_secret()
        upstream = PeerSender(run, rank, attempt, to_rank_0, token, aggregator=aggregator, on_layout=own_layout,
                              node=len(node), on_answer=merger.note_answer, queue_size=1024)
        merger.serve(run, attempt, world, node_secret, node, upstream)
        store.set(node_key + "/secret", node_secret)
        store.set(node_key, merger.address)
    return PeerSender(run, rank, attempt, _store_reader(store, node_key, node_key + "/secret"), token,
                      aggregator=aggregator)
