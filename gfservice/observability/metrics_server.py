"""A small HTTP(S) server for ``/metrics`` that no client can stall.

One thread owns every socket and does all network I/O without blocking: accepting, the TLS handshake, reading
the request and writing the response, each under a deadline (``timeout_s``). A client that connects and sends
nothing, sends its request one byte a second, or never starts its TLS handshake holds no thread and delays no
one; it is closed at its deadline, or sooner when ``max_connections`` are open and a new client arrives (the
oldest connection that has not sent its whole request yet makes room). Only complete requests reach the worker
threads (at most ``max_threads``), which build the scrape and hand the bytes back to the I/O thread.

Routes: ``GET /metrics`` (Prometheus text, or OpenMetrics when the ``Accept`` header asks, gzip when allowed:
the choices of ``prometheus_client``'s own exposition), ``GET /-/healthy``, ``/`` a pointer to ``/metrics``,
404 otherwise; one request per connection.

>>> import urllib.request
>>> from prometheus_client import CollectorRegistry
>>> server = MetricsServer(CollectorRegistry(), "127.0.0.1", 0)
>>> thread = server.start()
>>> urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/-/healthy").read()
b'OK\\n'
>>> server.shutdown(); server.server_close()
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import queue
import selectors
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted

__all__ = ["MetricsServer", "tls_context"]

log = logging.getLogger(__name__)

#: Longest request head (request line and headers) read; a longer one gets 431.
MAX_REQUEST_BYTES = 16 * 1024
_READ, _WORK, _WRITE = "read", "work", "write"


def tls_context(certfile: str, keyfile: str, client_cafile: str | None = None) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later); with ``client_cafile``, clients must present a certificate
    signed by that CA (mutual TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=certfile, keyfile=keyfile)
    if client_cafile:
        ctx.load_verify_locations(cafile=client_cafile)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    deadline: float
    handshaking: bool = False
    state: str = _READ
    head: bytearray = field(default_factory=bytearray)
    out: memoryview = field(default_factory=lambda: memoryview(b""))


class MetricsServer:
    """Serves ``registry`` on ``address:port`` (0 picks a free port); HTTPS when ``ssl_context`` is given.

    Call :meth:`start` (or run :meth:`serve_forever` in a thread of your own); stop with
    ``shutdown(); server_close()``. ``server_address`` and ``server_port`` tell where it listens.
    """

    def __init__(self, registry: CollectorRegistry, address: str = "127.0.0.1", port: int = 0, *,
                 ssl_context: ssl.SSLContext | None = None, timeout_s: float = 10.0, max_threads: int = 4,
                 max_connections: int = 256):
        self.registry = registry
        self.ssl_context = ssl_context
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        self.socket = socket.create_server((address, port), family=family, backlog=128)
        self.socket.setblocking(False)
        self.server_address: tuple[Any, ...] = self.socket.getsockname()
        self.server_port: int = int(self.server_address[1])
        self._workers = ThreadPoolExecutor(max_threads, thread_name_prefix="gfservice-metrics")
        self._done: queue.SimpleQueue[tuple[_Conn, bytes]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.socket, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._conns: dict[_Conn, None] = {}  # insertion order: oldest first
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        """Serve in a daemon thread, which is returned."""
        thread = threading.Thread(target=self.serve_forever, name="gfservice-metrics-io", daemon=True)
        self._stopped.clear()
        thread.start()
        return thread

    def serve_forever(self) -> None:
        self._stopped.clear()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wait = min([0.5, *(c.deadline - now for c in self._conns if c.state != _WORK)])
                for key, _mask in self._sel.select(max(wait, 0.0)):
                    try:
                        if key.data == "accept":
                            self._accept()
                        elif key.data == "wake":
                            self._collect_responses()
                        else:
                            self._service(key.data)
                    except Exception:  # a bug here must cost one connection, not the endpoint
                        log.exception("gfservice metrics server: unexpected error")
                        if isinstance(key.data, _Conn):
                            self._close(key.data)
                self._expire(time.monotonic())
        finally:
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serving; returns once the I/O thread has stopped."""
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        """Close every connection and the listening socket; the worker threads end."""
        self._stop.set()
        for conn in list(self._conns):
            self._close(conn)
        self._workers.shutdown(wait=False, cancel_futures=True)
        for s in (self.socket, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()

    # ---- the I/O thread ---------------------------------------------------------------------------
    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, _addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors and the like: try again at the next wakeup
                log.warning("gfservice metrics server: accept failed: %s", exc)
                return
            if len(self._conns) >= self.max_connections and not self._make_room():
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self.timeout_s)
            if self.ssl_context is not None:
                try:
                    conn.sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError):
                    sock.close()
                    continue
                conn.handshaking = True
            self._conns[conn] = None
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _make_room(self) -> bool:
        """Close the oldest connection still waiting for its request; False when every one is being served."""
        for conn in self._conns:
            if conn.state == _READ:
                self._close(conn)
                return True
        return False

    def _service(self, conn: _Conn) -> None:
        try:
            if conn.handshaking:
                conn.sock.do_handshake()  # type: ignore[attr-defined]
                conn.handshaking = False
            if conn.state == _READ:
                self._read(conn)
            elif conn.state == _WRITE:
                self._write(conn)
        except ssl.SSLWantReadError:
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
        except ssl.SSLWantWriteError:
            self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        except (BlockingIOError, InterruptedError):
            pass
        except (OSError, ValueError) as exc:  # reset, TLS failures (a client without a certificate), ...
            log.debug("gfservice metrics server: connection closed: %s", exc)
            self._close(conn)

    def _read(self, conn: _Conn) -> None:
        while True:
            data = conn.sock.recv(65536)
            if not data:
                self._close(conn)
                return
            conn.head += data
            end = conn.head.find(b"\r\n\r\n")
            if end >= 0 or len(conn.head) > MAX_REQUEST_BYTES:
                self._sel.unregister(conn.sock)
                conn.state = _WORK
                if end < 0:
                    self._respond(conn, _response(431, b"request header too large\n"))
                else:
                    head = bytes(conn.head[:end])
                    self._workers.submit(self._handle, conn, head)
                return

    def _write(self, conn: _Conn) -> None:
        while conn.out:
            sent = conn.sock.send(conn.out)
            conn.out = conn.out[sent:]
        self._close(conn)

    def _collect_responses(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                conn, data = self._done.get_nowait()
            except queue.Empty:
                return
            if conn in self._conns:
                self._respond(conn, data)

    def _respond(self, conn: _Conn, data: bytes) -> None:
        conn.state = _WRITE
        conn.out = memoryview(data)
        conn.deadline = time.monotonic() + self.timeout_s
        self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)
        self._service(conn)

    def _expire(self, now: float) -> None:
        late = [c for c in self._conns if c.state != _WORK and c.deadline <= now]
        for conn in late:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(conn.sock)
        conn.sock.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # the pipe is full (a wakeup is pending anyway) or closed
            self._wake_w.send(b"x")

    # ---- worker threads -----------------------------------------------------------------------------
    def _handle(self, conn: _Conn, head: bytes) -> None:
        try:
            data = self.answer(head)
        except Exception:  # never leave a client hanging
            log.exception("gfservice metrics server: request failed")
            data = _response(500, b"internal error\n")
        self._done.put((conn, data))
        self._wake()

    def answer(self, head: bytes) -> bytes:
        """The whole HTTP response to one request head (request line and headers, without the blank line).

        >>> server = MetricsServer(CollectorRegistry())
        >>> server.answer(b"GET /nope HTTP/1.1\\r\\nHost: x").split(b"\\r\\n")[0]
        b'HTTP/1.1 404 Not Found'
        >>> server.server_close()
        """
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, b"bad request\n")
        method, target, _version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                return _response(400, b"bad request\n")
            headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return _response(405, b"use GET\n", [("Allow", "GET, HEAD")])
        path = target.partition("?")[0]
        if path == "/metrics":
            status, extra, body = 200, *self._metrics(headers)
        elif path == "/-/healthy":
            status, extra, body = 200, [("Content-Type", "text/plain; charset=utf-8")], b"OK\n"
        elif path == "/":
            status, extra, body = 200, [("Content-Type", "text/plain; charset=utf-8")], b"gfservice: see /metrics\n"
        else:
            return _response(404, b"not found: try /metrics\n")
        return _response(status, body, extra, head_only=method == "HEAD")

    def _metrics(self, headers: dict[str, str]) -> tuple[list[tuple[str, str]], bytes]:
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        fast = getattr(self.registry, "exposition", None)  # the gradflow registry formats its own, faster
        body = fast(content_type) if fast is not None else encoder(self.registry)
        extra = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body, compresslevel=6)
            extra.append(("Content-Encoding", "gzip"))
        return extra, body


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error"}


def _response(status: int, body: bytes, headers: list[tuple[str, str]] | None = None,
              head_only: bool = False) -> bytes:
    headers = headers or [("Content-Type", "text/plain; charset=utf-8")]
    lines = [f"HTTP/1.1 {status} {_REASONS[status]}", *(f"{k}: {v}" for k, v in headers),
             f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (b"" if head_only else body)

