"""Rank 0 of a torchrun or Slurm job without Ray: the job's aggregator, fed by every rank over TCP.

Each rank (rank 0 too) holds one TCP connection to rank 0's :class:`PeerServer` (never the training process
group's collectives). Frames are length-prefixed JSON (4 bytes big-endian, then UTF-8; NaN/Inf travel as the
JSON constants ``NaN``/``Infinity``). The first frame is a hello, answered ``{"ok": true}`` or refused; then each
request is a :class:`~gfservice.wire.Batch` (``{"run": RUN, "messages": [wire messages], "dropped": N}``) and
each answer a :class:`~gfservice.wire.BatchAnswer`, as on the Ray path (``{"rejected": [[i, reason]], "stop":
{RUN: REASON or null}}``, plus ``"findings"``, the run's findings, whenever they changed). An empty request is a
poll: it brings verdicts to ranks that have nothing to send. (Protocol 2; protocol 1 answered ``"stop"`` as a
bare reason.) Every message is validated by the
aggregator (:func:`gfservice.wire.parse`); a frame that is not JSON, too big or of the wrong shape closes its
connection and is counted in ``bad_frames``, never more.

Trust: anyone who can connect may submit, as with the Ray service. The server binds loopback (one node) or
the interface of ``MASTER_ADDR`` (several nodes); with ``GFSERVICE_TOKEN`` set, a hello without the same token
is refused (compared with :func:`hmac.compare_digest`) and counted in ``refused``.

>>> from gfservice.service.aggregator import Aggregator
>>> import socket
>>> server = PeerServer(Aggregator(), token="s3cret")
>>> sock = socket.create_connection(server.sockaddr)
>>> sock.sendall(encode_frame(hello("s3cret"))); read_frame(sock)
{'ok': True}
>>> lay = {"kind": "layout", "run": "doc", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [2],
...        "sharded": [False]}
>>> step = {"kind": "step", "run": "doc", "rank": 0, "step": 0,
...         "stats": {"count": [2], "sum_sq": [float("nan")], "max_abs": [float("nan")], "nonfinite": [1]}}
>>> sock.sendall(encode_frame({"run": "doc", "messages": [lay, step, {"kind": "step"}], "dropped": 0}))
>>> answer = read_frame(sock)
>>> answer["rejected"], answer["stop"], [f["detector"] for f in answer["findings"]]
([[2, 'invalid']], {'doc': None}, ['nonfinite'])
>>> sock.close(); server.close()
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import socketserver
import struct
import threading
import time
from typing import Any

from pydantic import ValidationError

from gfservice.api import Finding
from gfservice.service.aggregator import Aggregator
from gfservice.service.ingest import take
from gfservice.wire import Batch

__all__ = ["MAX_FRAME", "PEER_PROTOCOL", "FrameError", "PeerServer", "encode_frame", "hello", "read_frame"]

log = logging.getLogger(__name__)

#: Largest frame either side accepts (a 1M-layer report is about 100 MB of JSON).
MAX_FRAME = 256 * 2**20
#: What a hello says; a connection that says something else is refused.
HELLO = "gfservice-peer"
#: The peer protocol; 2 answers every batch with a :class:`~gfservice.wire.BatchAnswer`.
PEER_PROTOCOL = 2
_HEADER = struct.Struct(">I")


class FrameError(ValueError):
    """A frame that is too big, cut short or not JSON."""


def encode_frame(obj: Any) -> bytes:
    """``obj`` as one frame: its length (4 bytes, big-endian), then its JSON.

    >>> encode_frame({"a": float("nan")})
    b'\\x00\\x00\\x00\\t{"a":NaN}'
    """
    data = json.dumps(obj, allow_nan=True, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes is over the limit of {MAX_FRAME}")
    return _HEADER.pack(len(data)) + data


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, max_bytes: int = MAX_FRAME) -> Any:
    """Read one frame from ``sock``; raises :class:`EOFError` at a clean end, :class:`FrameError` for a bad one."""
    (n,) = _HEADER.unpack(_read_exact(sock, _HEADER.size))
    if n > max_bytes:
        raise FrameError(f"frame of {n} bytes is over the limit of {max_bytes}")
    try:
        return json.loads(_read_exact(sock, n))
    except EOFError:
        raise FrameError("frame cut short") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FrameError(f"not JSON: {exc}") from None


def hello(token: str | None = None) -> dict[str, Any]:
    """The first frame a rank sends."""
    return {"hello": HELLO, "version": PEER_PROTOCOL, "token": token or ""}


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        self.server.peer.serve_connection(self.request)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    peer: PeerServer


class PeerServer:
    """Takes the ranks' messages over TCP into ``aggregator``, each connection on its own thread, and merges
    overdue steps (ranks that stopped reporting) every ``tick_interval_s``.

    ``port=0`` picks a free port; :attr:`address` is ``host:port`` for the ranks. ``close()`` stops it.
    """

    def __init__(self, aggregator: Aggregator, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 tick_interval_s: float = 0.5, max_frame: int = MAX_FRAME, hello_timeout_s: float = 10.0):
        self.aggregator = aggregator
        self.token = token or None
        self.max_frame = max_frame
        self.hello_timeout_s = hello_timeout_s
        #: Connections taken, hellos refused (wrong token or protocol), and frames that closed their connection.
        self.connections = 0
        self.refused = 0
        self.bad_frames = 0
        self._tcp = _TCPServer((host, port), _Handler)
        self._tcp.peer = self
        self.sockaddr: tuple[str, int] = self._tcp.server_address[:2]  # type: ignore[assignment]
        #: How often the findings sent back to the ranks are read again from the aggregator.
        self.findings_refresh_s = 0.1
        self._cache: dict[str, tuple[float, tuple[tuple[int, int], list[Finding]]]] = {}
        self._cache_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._tcp.serve_forever, kwargs={"poll_interval": 0.2},
                             name="gfservice-peer-server", daemon=True),
            threading.Thread(target=self._tick_loop, args=(tick_interval_s,), name="gfservice-peer-ticker",
                             daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def address(self) -> str:
        """``host:port`` the ranks connect to (``[host]:port`` for IPv6)."""
        host, port = self.sockaddr
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _tick_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.aggregator.tick()
            except Exception:
                log.exception("gfservice peer ticker failed; continuing")

    def serve_connection(self, sock: socket.socket) -> None:
        """One rank's connection: the hello, then requests answered in turn until it closes."""
        peer = "{}:{}".format(*sock.getpeername()[:2])
        sock.settimeout(self.hello_timeout_s)
        try:
            first = read_frame(sock, 4096)
            refusal = self._check_hello(first)
            if refusal:  # counted before the answer, so whoever reads the answer sees the count
                self.refused += 1
                log.warning("gfservice peer server refused %s: %s", peer, refusal)
                sock.sendall(encode_frame({"ok": False, "error": refusal}))
                return
            self.connections += 1
            sock.sendall(encode_frame({"ok": True}))
            sock.settimeout(None)  # a rank may be quiet for long (a slow step); it polls while idle
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a vanished host ends its thread
            seen: tuple[int, int] | None = None
            while True:
                try:
                    request = read_frame(sock, self.max_frame)
                except EOFError:
                    return
                answer, seen = self._answer(request, seen)
                sock.sendall(encode_frame(answer))
        except (FrameError, ValueError, TypeError) as exc:
            self.bad_frames += 1
            log.warning("gfservice peer server closed the connection of %s: %s", peer, exc)
        except (OSError, EOFError) as exc:
            log.info("gfservice peer server: connection of %s lost: %s", peer, exc)

    def _check_hello(self, first: Any) -> str | None:
        if not isinstance(first, dict) or first.get("hello") != HELLO:
            return "not a gfservice peer hello"
        if first.get("version") != PEER_PROTOCOL:
            return f"peer protocol {first.get('version')!r}; this server speaks {PEER_PROTOCOL}"
        if self.token is not None:
            given = first.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.token.encode()):
                return "wrong or missing GFSERVICE_TOKEN"
        return None

    def _answer(self, request: Any, seen: tuple[int, int] | None) -> tuple[dict[str, Any], tuple[int, int] | None]:
        """Submit a request's messages; the verdict for its run, and its findings when they changed since
        ``seen`` (their count and how many are active)."""
        if not isinstance(request, dict):
            raise FrameError("a request must be a JSON object")
        try:
            batch = Batch.model_validate(request)
        except ValidationError:
            raise FrameError("a request needs run (a string), messages (a list) and dropped (an integer)") from None
        answer, _ = take(self.aggregator, batch.messages, batch.dropped_by_run(), [batch.run])
        found = self._findings(batch.run)
        if found is not None and found[0] != seen:
            answer = answer.model_copy(update={"findings": found[1]})
        return answer.plain(), found[0] if found is not None else seen

    def _findings(self, run: str) -> tuple[tuple[int, int], list[Finding]] | None:
        """The findings of ``run``, with their count and how many are active; read from the aggregator at most
        once per ``findings_refresh_s`` whatever the number of ranks asking."""
        now = time.monotonic()
        with self._cache_lock:
            cached = self._cache.get(run)
            if cached is not None and now - cached[0] < self.findings_refresh_s:
                return cached[1]
        try:
            findings = self.aggregator.findings(run)
        except KeyError:
            return None
        value = ((len(findings), sum(f.active for f in findings)), findings)
        with self._cache_lock:
            self._cache[run] = (now, value)
            if len(self._cache) > 64:  # runs come and go: forget the stalest
                del self._cache[min(self._cache, key=lambda r: self._cache[r][0])]
        return value

    def close(self) -> None:
        self._stop.set()
        self._tcp.shutdown()
        self._tcp.server_close()
