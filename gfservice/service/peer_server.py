"""Rank 0 of a torchrun or Slurm job without Ray: the job's aggregator, fed by every rank over TCP.

Each rank (rank 0 too) holds one TCP connection to rank 0's :class:`PeerServer` (never the training process
group's collectives), speaking :mod:`gfservice.service.peer_protocol`: a handshake in which the rank proves it
holds its attempt's key, then :class:`~gfservice.envelopes.Batch` requests answered by
:class:`~gfservice.envelopes.BatchAnswer`. Rank 0 registers each attempt of its job with :meth:`PeerServer.admit`
(its key comes from a secret that rank 0 made and shared through the job's rendezvous store); a connection can
only speak for a registered ``(run, attempt)``, and then only for the run, rank and attempt it authenticated as
(other messages are refused ``unauthorized``). A node merger's connection (``"node": n`` in its hello, at most
the ``node_size`` the attempt was admitted with, never past its world size) speaks for its node's ranks
``rank .. rank + n - 1``: a node layout or node report covering any other rank is refused ``unauthorized``.
:class:`PeerListener` is the machinery without the aggregator: the node merger's loopback server
(:mod:`gfservice.hosting.node_merger`) is another one.

**Bounds.** One I/O thread multiplexes every connection (:mod:`selectors`, non-blocking); one worker thread
decodes and ingests (a connection has at most one request in the worker; its next one is not read until the
answer is written). Every hello must arrive whole within ``hello_timeout_s`` of the accept, every frame within
``frame_timeout_s`` of its first byte. A frame over :meth:`PeerServer.frame_limit` (4 KiB for a hello; then
derived from the attempt's layout: layers x statistics x 32 bytes per report, times a batch, plus the layout;
:data:`PRE_LAYOUT_CAP` until one is known) is refused from its header, before it is read. Unauthenticated
connections are capped at ``max_pending`` (the oldest is dropped for a new one); authenticated ones at the
registered world sizes plus ``margin``. Anything refused, cut short or late closes its connection and is counted.

>>> from gfservice.service.aggregator import Aggregator
>>> import socket
>>> server = PeerServer(Aggregator())
>>> key = server.admit("doc", "a1", world_size=1, secret="s3cret")
>>> sock = socket.create_connection(server.sockaddr)
>>> handshake(sock, key, "doc", 0, "a1")
>>> lay = {"kind": "layout", "run": "doc", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [2],
...        "sharded": [False], "attempt": "a1"}
>>> step = {"kind": "step", "run": "doc", "rank": 0, "step": 0, "attempt": "a1",
...         "stats": {"count": [2], "sum_sq": [float("nan")], "max_abs": [float("nan")], "nonfinite": [1]}}
>>> sock.sendall(encode_frame({"run": "doc", "messages": [lay, step, {"kind": "step"}], "dropped": 0}))
>>> answer = read_frame(sock)
>>> answer["rejected"], answer["stop"], [f["detector"] for f in answer["findings"]]
([[2, 'unauthorized']], {'doc': None}, ['nonfinite'])
>>> sock.close(); server.close()
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import queue
import secrets
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from gfservice.api import Finding
from gfservice.envelopes import Batch, BatchAnswer
from gfservice.service.aggregator import Aggregator
from gfservice.service.auth import peer_key, peer_proof, proof_matches
from gfservice.service.ingest import take
from gfservice.service.peer_protocol import (
    HELLO,
    HELLO_CAP,
    MAX_FRAME,
    PEER_PROTOCOL,
    PRE_LAYOUT_CAP,
    FrameError,
    HandshakeError,
    decode_frame,
    decode_request,
    derived_attempt,
    encode_frame,
    frame_limit,
    handshake,
    hello_proof_parts,
    read_frame,
    speaks_for,
    speaks_for_ranks,
)
from gfservice.wire import RejectReason

# The protocol's names stay importable from here (tests, benchmarks and the sender used them from this module).
__all__ = ["MAX_FRAME", "PEER_PROTOCOL", "PRE_LAYOUT_CAP", "FrameError", "HandshakeError", "PeerListener", "PeerServer",
           "decode_request", "derived_attempt", "encode_frame", "frame_limit", "handshake", "read_frame"]

log = logging.getLogger(__name__)
_HEADER = struct.Struct(">I")

@dataclass
class _Admitted:
    """One attempt of the job that rank 0 registered: its key, world size, and the frame limit its layout sets."""

    key: bytes
    world_size: int
    limit: int = PRE_LAYOUT_CAP
    #: The most ranks one connection may speak for (a node merger's: its node's).
    node_size: int = 1
    #: The ranks that may connect (a node merger's server: its node's); the whole world when None.
    ranks: range | None = None


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    peer: str
    opened: float
    nonce: str = field(default_factory=lambda: secrets.token_hex(16))
    identity: tuple[str, int, str] | None = None  # (run, rank, attempt) once authenticated
    covers: range = range(0)  # the ranks it speaks for: its rank, or a node merger's node
    inbuf: bytearray = field(default_factory=bytearray)
    need: int | None = None  # the body length of the frame being read
    frame_started: float | None = None
    last_active: float = 0.0
    out: bytes = b""
    out_since: float = 0.0
    busy: bool = False  # a request is with the worker
    close_after_write: bool = False  # a refusal: close once it is written
    closed: bool = False
    seen: tuple[int, int] | None = None  # the findings marker last sent


class PeerListener:
    """The authenticated, non-blocking server of the peer protocol, without what it serves: a subclass says
    where a request's messages go (:meth:`_submit`), what runs every ``tick_interval_s`` (:meth:`_tick`) and
    where the findings come from (:meth:`_read_findings`). See :class:`PeerServer`.

    ``port=0`` picks a free port; :attr:`address` is ``host:port`` for the ranks. ``close()`` stops it.
    Counters: ``connections`` (authenticated), ``refused`` (hellos refused), ``bad_frames`` (frames that closed
    their connection: not JSON, wrong shape, over the limit), ``timed_out`` (hellos or frames too slow, idle
    connections), ``evicted`` (unauthenticated connections dropped for newer ones, or over the connection bound).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 tick_interval_s: float = 0.5, *, hello_timeout_s: float = 5.0, frame_timeout_s: float = 10.0,
                 idle_timeout_s: float = 300.0, max_pending: int = 8, margin: int = 4, max_attempts: int = 16):
        self.token = token or None
        self.hello_timeout_s = hello_timeout_s
        self.frame_timeout_s = frame_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_pending = max_pending
        self.margin = margin
        self.max_attempts = max_attempts
        self.connections = self.refused = self.bad_frames = self.timed_out = self.evicted = 0
        self._last_warning = -1.0
        #: How often the findings sent back to the ranks are read again from the aggregator.
        self.findings_refresh_s = 0.1
        self._admitted: collections.OrderedDict[tuple[str, str], _Admitted] = collections.OrderedDict()
        self._lock = threading.Lock()  # _admitted, between rank 0's threads, the worker and the I/O thread
        self._cache: dict[str, tuple[float, tuple[tuple[int, int], list[Finding]]]] = {}
        self._conns: set[_Conn] = set()
        self._work: queue.SimpleQueue[tuple[_Conn, bytearray] | None] = queue.SimpleQueue()
        self._done: collections.deque[tuple[_Conn, bytes | None]] = collections.deque()
        self._listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                              backlog=64)
        self._listener.setblocking(False)
        self.sockaddr: tuple[str, int] = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._tick_interval_s = tick_interval_s
        self._threads = [threading.Thread(target=self._io_loop, name="gfservice-peer-io", daemon=True),
                         threading.Thread(target=self._work_loop, name="gfservice-peer-worker", daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def address(self) -> str:
        """``host:port`` the ranks connect to (``[host]:port`` for IPv6)."""
        host, port = self.sockaddr
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # ---- what rank 0 tells it ---------------------------------------------------------------------
    def admit(self, run: str, attempt: str, world_size: int, secret: str, *, node_size: int = 1,
              ranks: range | None = None) -> bytes:
        """Let the ranks of ``attempt`` of ``run`` (``world_size`` of them) in: those that prove they hold the key
        made from ``secret`` (and the server's token, when it has one). Returns that key. ``node_size``: the
        most ranks a node merger's connection may speak for (1: none); ``ranks``: the only ranks that may
        connect (a node merger's server: its node's)."""
        key = peer_key(secret, self.token)
        with self._lock:
            self._admitted[(run, attempt)] = _Admitted(key, max(1, world_size), node_size=max(1, node_size),
                                                       ranks=ranks)
            self._admitted.move_to_end((run, attempt))
            while len(self._admitted) > self.max_attempts:
                self._admitted.popitem(last=False)
        return key

    def expect_layout(self, run: str, attempt: str, layers: int, layout_bytes: int = 0) -> None:
        """An attempt's layout is known (``layers`` layers, ``layout_bytes`` of JSON): raise its frame limit."""
        with self._lock:
            adm = self._admitted.get((run, derived_attempt(attempt, 0)))
            if adm is not None:
                adm.limit = max(adm.limit, frame_limit(layers, layout_bytes))

    def frame_limit(self, conn_identity: tuple[str, int, str] | None) -> int:
        """The largest frame a connection may send now: a hello's before it authenticates, then its attempt's."""
        if conn_identity is None:
            return HELLO_CAP
        with self._lock:
            adm = self._admitted.get((conn_identity[0], conn_identity[2]))
            return adm.limit if adm is not None else PRE_LAYOUT_CAP

    def _max_ready(self) -> int:
        with self._lock:
            return sum(len(a.ranks or range(a.world_size)) for a in self._admitted.values()) + self.margin

    # ---- the I/O thread ---------------------------------------------------------------------------
    def _io_loop(self) -> None:
        next_check = 0.0
        while not self._stop.is_set():
            try:
                events = self._sel.select(timeout=0.05)
            except OSError:  # closed under us
                break
            for key, mask in events:
                try:
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        conn: _Conn = key.data
                        if mask & selectors.EVENT_WRITE:
                            self._write(conn)
                        if mask & selectors.EVENT_READ and not conn.closed:
                            self._read(conn)
                except Exception:
                    log.exception("gfservice peer server: I/O error; continuing")
            while self._done:
                conn, answer = self._done.popleft()
                conn.busy = False
                if answer is None:
                    self._close(conn)
                elif not conn.closed:
                    self._queue_out(conn, answer)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.05
                self._enforce_deadlines(now)
        for conn in list(self._conns):
            self._close(conn)

    def _accept(self) -> None:
        for _ in range(16):  # a burst of connections: take up to 16 per wake-up
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors and the like: the listener stays
                log.warning("gfservice peer server: accept failed: %s", exc)
                return
            sock.setblocking(False)
            now = time.monotonic()
            conn = _Conn(sock, "{}:{}".format(*addr[:2]), now, last_active=now)
            pending = sorted((c for c in self._conns if c.identity is None), key=lambda c: c.opened)
            while len(pending) >= self.max_pending:  # make room: the oldest stranger goes
                self.evicted += 1
                self._close(pending.pop(0))
            self._conns.add(conn)
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self._queue_out(conn, encode_frame({"hello": HELLO, "version": PEER_PROTOCOL, "nonce": conn.nonce}))

    def _read(self, conn: _Conn) -> None:
        try:
            want = _HEADER.size - len(conn.inbuf) if conn.need is None else conn.need - len(conn.inbuf)
            chunk = conn.sock.recv(min(max(want, 1), 1 << 18))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("gfservice peer server: connection of %s lost: %s", conn.peer, exc)
            self._close(conn)
            return
        if not chunk:
            self._close(conn)
            return
        now = time.monotonic()
        conn.last_active = now
        if conn.frame_started is None:
            conn.frame_started = now
        conn.inbuf += chunk
        if conn.need is None:
            if len(conn.inbuf) < _HEADER.size:
                return
            (n,) = _HEADER.unpack(bytes(conn.inbuf))
            limit = self.frame_limit(conn.identity)
            if n > limit:
                self._bad(conn, f"frame of {n} bytes is over this connection's limit of {limit}")
                return
            conn.need, conn.inbuf = n, bytearray()
            if n:
                return
        if len(conn.inbuf) < conn.need:
            return
        data, conn.inbuf, conn.need, conn.frame_started = conn.inbuf, bytearray(), None, None
        if conn.identity is None:
            self._hello(conn, data)
        else:  # to the worker; read nothing more from this connection until it is answered
            conn.busy = True
            self._set_events(conn, selectors.EVENT_WRITE if conn.out else 0)
            self._work.put((conn, data))

    def _hello(self, conn: _Conn, data: bytearray) -> None:
        try:
            first = decode_frame(data)
        except FrameError as exc:
            self._bad(conn, str(exc))
            return
        identity, covers, key, refusal = self._check_hello(first, conn.nonce)
        if refusal or identity is None or key is None:
            self.refused += 1  # counted before the answer, so whoever reads the answer sees the count
            self._warn("gfservice peer server refused %s: %s", conn.peer, refusal)
            self._queue_out(conn, encode_frame({"ok": False, "error": refusal}), then_close=True)
            return
        same = [c for c in self._conns if c.identity == identity]
        for old in same:  # a rank that reconnects replaces its old connection
            self._close(old)
        if sum(c.identity is not None for c in self._conns) >= self._max_ready():
            self.evicted += 1
            self._queue_out(conn, encode_frame({"ok": False, "error": "too many connections"}), then_close=True)
            return
        conn.identity, conn.covers = identity, covers
        self.connections += 1
        with contextlib.suppress(OSError):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._queue_out(conn, encode_frame({"ok": True, "proof": peer_proof(key, "server", conn.nonce,
                                                                              first["nonce"])}))

    def _check_hello(self, first: Any, nonce: str) -> tuple[tuple[str, int, str] | None, range, bytes | None,
                                                            str | None]:
        none = range(0)
        if not isinstance(first, dict) or first.get("hello") != HELLO:
            return None, none, None, "not a gfservice peer hello"
        if first.get("version") != PEER_PROTOCOL:
            return None, none, None, f"peer protocol {first.get('version')!r}; this server speaks {PEER_PROTOCOL}"
        run, rank, attempt, theirs = (first.get(k) for k in ("run", "rank", "attempt", "nonce"))
        node = first.get("node", 1)
        if not (isinstance(run, str) and isinstance(attempt, str) and type(rank) is int and isinstance(theirs, str)
                and len(theirs) <= 64 and type(node) is int and node >= 1):
            return None, none, None, "a hello needs run, rank, attempt and nonce"
        with self._lock:
            adm = self._admitted.get((run, attempt))
        covers = range(rank, rank + node)
        allowed = adm.ranks if adm is not None and adm.ranks is not None else range(adm.world_size if adm else 0)
        if adm is None or rank not in allowed:
            return None, none, None, "not a rank of an attempt of this job"  # says nothing about which runs exist
        if node > adm.node_size or covers[-1] not in allowed:
            return None, none, None, (f"a node of {node} ranks from rank {rank}: over the node size "
                                      f"{adm.node_size} or past the ranks this server takes")
        if not proof_matches(adm.key, first.get("proof"), *hello_proof_parts(nonce, theirs, run, rank, attempt, node)):
            return None, none, None, "wrong proof: not this job's key (GFSERVICE_TOKEN differs between ranks?)"
        return (run, rank, attempt), covers, adm.key, None

    def _queue_out(self, conn: _Conn, data: bytes, then_close: bool = False) -> None:
        if conn.closed:
            return
        if not conn.out:
            conn.out_since = time.monotonic()
        conn.out += data
        conn.close_after_write = conn.close_after_write or then_close
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._close(conn)
                return
            conn.out = conn.out[sent:]
            conn.out_since = time.monotonic() if sent else conn.out_since
        if not conn.out and conn.close_after_write:
            self._close(conn)
            return
        events = (selectors.EVENT_WRITE if conn.out else 0) | (0 if conn.busy else selectors.EVENT_READ)
        self._set_events(conn, events)

    def _set_events(self, conn: _Conn, events: int) -> None:
        if conn.closed:
            return
        registered = conn.sock in self._sel.get_map()
        if not events:
            if registered:
                self._sel.unregister(conn.sock)
        elif registered:
            self._sel.modify(conn.sock, events, conn)
        else:
            self._sel.register(conn.sock, events, conn)

    def _enforce_deadlines(self, now: float) -> None:
        for conn in list(self._conns):
            if conn.closed or conn.busy:
                continue
            late = None
            if conn.identity is None and now - conn.opened > self.hello_timeout_s:
                late = "no hello in time"
            elif conn.frame_started is not None and now - conn.frame_started > self.frame_timeout_s:
                late = f"a frame took over {self.frame_timeout_s:g} s"
            elif conn.out and now - conn.out_since > self.frame_timeout_s:
                late = "the answer was not read in time"
            elif conn.identity is not None and now - conn.last_active > self.idle_timeout_s:
                late = "idle"
            if late:
                self.timed_out += 1
                self._warn("gfservice peer server closed the connection of %s: %s", conn.peer, late)
                self._close(conn)

    def _bad(self, conn: _Conn, why: str) -> None:
        self.bad_frames += 1
        self._warn("gfservice peer server closed the connection of %s: %s", conn.peer, why)
        self._close(conn)

    def _warn(self, msg: str, *args: Any) -> None:
        """A warning, at most one a second (a flood of strangers must not flood rank 0's log); the rest at debug
        level, and all of them in the counters."""
        now = time.monotonic()
        if now - self._last_warning >= 1.0:
            self._last_warning = now
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self._conns.discard(conn)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
        conn.inbuf, conn.out = bytearray(), b""

    # ---- the worker thread: decode, ingest, answer -----------------------------------------------
    def _work_loop(self) -> None:
        next_tick = time.monotonic() + self._tick_interval_s
        while True:
            try:
                item = self._work.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                item = None
                if self._stop.is_set():
                    return
            else:
                if item is None:
                    return
            if item is not None:
                conn, data = item
                self._done.append((conn, self._serve(conn, data)))
                with contextlib.suppress(OSError):
                    self._wake_w.send(b"x")
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self._tick_interval_s
                try:
                    self._tick()
                except Exception:
                    log.exception("gfservice peer ticker failed; continuing")

    def _serve(self, conn: _Conn, data: bytearray) -> bytes | None:
        """The answer frame to one request, or ``None`` to close the connection (counted)."""
        try:
            request = decode_request(data)
            del data
            answer = self._answer(conn, request)
            return encode_frame(answer)
        except (FrameError, ValueError, TypeError) as exc:
            self.bad_frames += 1
            self._warn("gfservice peer server closed the connection of %s: %s", conn.peer, exc)
            return None
        except Exception:
            log.exception("gfservice peer server: a request failed; closing its connection")
            return None

    def _answer(self, conn: _Conn, request: Any) -> dict[str, Any]:
        """Submit a request's messages that its connection may speak for; the verdict for its run, and its
        findings when they changed since the connection last heard them."""
        assert conn.identity is not None
        run, _rank, attempt = conn.identity
        if not isinstance(request, dict):
            raise FrameError("a request must be a JSON object")
        try:
            batch = Batch.model_validate(request)
        except ValidationError:
            raise FrameError("a request needs run (a string), messages (a list) and dropped (an integer)") from None
        if batch.run != run:
            raise FrameError(f"a request for run {batch.run!r} over a connection of run {run!r}")
        allowed: list[Any] = []
        index: list[int] = []
        foreign: list[tuple[int, RejectReason]] = []
        for i, msg in enumerate(batch.messages):
            if (isinstance(msg, dict) and msg.get("run") == run and speaks_for_ranks(msg, conn.covers)
                    and speaks_for(msg.get("attempt", ""), attempt)):
                allowed.append(msg)
                index.append(i)
            else:
                foreign.append((i, RejectReason.unauthorized))
        answer = self._submit(run, allowed, batch.dropped_by_run())
        refused = {i for i, _ in answer.rejected}
        for i, msg in enumerate(allowed):  # an accepted layout sets the frame limit of its attempt
            if i not in refused and msg.get("kind") == "layout" and isinstance(msg.get("layers"), list):
                self.expect_layout(run, attempt, len(msg["layers"]), len(json.dumps(msg, allow_nan=True)))
        if foreign:
            rejected = sorted([(index[i], r) for i, r in answer.rejected] + foreign)
            answer = BatchAnswer(rejected=rejected, stop=answer.stop)
        elif answer.rejected:
            answer = BatchAnswer(rejected=[(index[i], r) for i, r in answer.rejected], stop=answer.stop)
        found = self._findings(run)
        if found is not None and found[0] != conn.seen:
            answer = answer.model_copy(update={"findings": found[1]})
            conn.seen = found[0]
        return answer.plain()

    def _findings(self, run: str) -> tuple[tuple[int, int], list[Finding]] | None:
        """The findings of ``run``, with their count and how many are active; read from the aggregator at most
        once per ``findings_refresh_s`` whatever the number of ranks asking."""
        now = time.monotonic()
        cached = self._cache.get(run)
        if cached is not None and now - cached[0] < self.findings_refresh_s:
            return cached[1]
        try:
            findings = self._read_findings(run)
        except KeyError:
            return None
        value = ((len(findings), sum(f.active for f in findings)), findings)
        self._cache[run] = (now, value)
        if len(self._cache) > 64:  # runs come and go: forget the stalest
            del self._cache[min(self._cache, key=lambda r: self._cache[r][0])]
        return value

    def close(self) -> None:
        self._stop.set()
        self._work.put(None)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        for t in self._threads:
            t.join(timeout=5)
        with contextlib.suppress(OSError):
            self._sel.close()
        for s in (self._listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()

    # ---- what a subclass serves -----------------------------------------------------------------
    def _submit(self, run: str, messages: list[Any], dropped: dict[str, int] | None) -> BatchAnswer:
        """Take the messages of ``run`` a connection may speak for (and the drops it reports)."""
        raise NotImplementedError

    def _tick(self) -> None:
        """Runs every ``tick_interval_s`` on the worker thread."""

    def _read_findings(self, run: str) -> list[Finding]:
        """The findings of ``run`` (``KeyError`` when it is not known)."""
        raise KeyError(run)


class PeerServer(PeerListener):
    """Takes the ranks' messages over TCP into ``aggregator`` (see the module doc for the protocol and bounds),
    and merges overdue steps (ranks that stopped reporting) every ``tick_interval_s``.

    ``port=0`` picks a free port; :attr:`address` is ``host:port`` for the ranks. ``close()`` stops it.
    Counters: ``connections`` (authenticated), ``refused`` (hellos refused), ``bad_frames`` (frames that closed
    their connection: not JSON, wrong shape, over the limit), ``timed_out`` (hellos or frames too slow, idle
    connections), ``evicted`` (unauthenticated connections dropped for newer ones, or over the connection bound).
    """

    def __init__(self, aggregator: Aggregator, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 tick_interval_s: float = 0.5, **limits: Any):
        self.aggregator = aggregator
        super().__init__(host, port, token, tick_interval_s, **limits)

    def _submit(self, run: str, messages: list[Any], dropped: dict[str, int] | None) -> BatchAnswer:
        return take(self.aggregator, messages, dropped, [run])[0]

    def _tick(self) -> None:
        self.aggregator.tick()

    def _read_findings(self, run: str) -> list[Finding]:
        return self.aggregator.findings(run)
