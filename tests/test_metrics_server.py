"""The /metrics server against hostile and careless clients, over real sockets with real TLS: idle connections,
slowloris clients, TLS clients that never say hello; scrapes still answer at once, and the threads stay bounded."""

from __future__ import annotations

import datetime
import gzip
import ipaddress
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gfservice.observability.exporter import ExporterConfig, serve_metrics
from gfservice.service.aggregator import Aggregator
from gfservice.wire import Layout


def _cert(name: str, key, issuer_key=None, issuer: x509.Certificate | None = None, ca: bool = False):
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.subject if issuer else subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(name))])
                                        if name[0].isdigit() else x509.SubjectAlternativeName([x509.DNSName(name)]),
                                        critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key) -> tuple[str, str]:
    crt, pem = path.with_suffix(".crt"), path.with_suffix(".key")
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return str(crt), str(pem)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, both signed by the CA (PEM files)."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, srv_key, cli_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("gfservice test CA", ca_key, ca=True)
    return {"ca": _write(d / "ca", ca, ca_key),
            "server": _write(d / "server", _cert("127.0.0.1", srv_key, ca_key, ca), srv_key),
            "client": _write(d / "client", _cert("prometheus", cli_key, ca_key, ca), cli_key)}


def aggregator() -> Aggregator:
    agg = Aggregator()
    agg.submit(Layout(run="r", rank=0, world_size=1, layers=["a", "b"], numel=[2, 2], sharded=[False, False]))
    agg.submit({"kind": "step", "run": "r", "rank": 0, "step": 0, "count": [2, 2], "sum_sq": [1.0, 4.0],
                "max_abs": [1.0, 2.0], "nonfinite": [0, 0]})
    return agg


class Endpoint:
    def __init__(self, server, port: int, scheme: str, client_ctx: ssl.SSLContext | None):
        self.server, self.port, self.scheme, self.client_ctx = server, port, scheme, client_ctx

    def url(self, path: str = "/metrics") -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def get(self, path: str = "/metrics", headers: dict[str, str] | None = None, timeout: float = 5.0):
        req = urllib.request.Request(self.url(path), headers=headers or {})
        return urllib.request.urlopen(req, timeout=timeout, context=self.client_ctx)

    def timed_scrape(self) -> tuple[float, str]:
        t0 = time.perf_counter()
        with self.get() as resp:
            assert resp.status == 200
            body = resp.read().decode()
        return time.perf_counter() - t0, body

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=5)

    def connect_tls(self) -> socket.socket:
        """A connection ready for HTTP: for HTTPS, after a completed handshake."""
        sock = self.connect()
        if self.client_ctx is None:
            return sock
        return self.client_ctx.wrap_socket(sock, server_hostname="127.0.0.1")

    def io_threads(self) -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("gfservice-metrics")]


@pytest.fixture
def serve(pki) -> Iterator:
    """Start an exporter: serve(scheme, **config) -> Endpoint."""
    servers = []

    def start(scheme: str = "http", **config) -> Endpoint:
        ctx = None
        if scheme == "https":
            config = {"certfile": pki["server"][0], "keyfile": pki["server"][1], **config}
            ctx = ssl.create_default_context(cafile=pki["ca"][0])
        server, _thread, port = serve_metrics(aggregator(), ExporterConfig(**config))
        servers.append(server)
        return Endpoint(server, port, scheme, ctx)

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (reading EOF or a reset)."""
    sock.settimeout(within)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except (ConnectionResetError, ssl.SSLError, ssl.SSLEOFError):
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_idle_connections_do_not_stall_a_scrape(serve, scheme):
    ep = serve(scheme)
    idle = [ep.connect() for _ in range(20)]  # TCP only: for HTTPS, clients that never send a ClientHello
    if scheme == "https":
        for s in idle[:5]:
            s.sendall(b"\x16\x03\x01")  # the first bytes of a TLS record, and then nothing
    try:
        elapsed, body = ep.timed_scrape()
        assert elapsed < 1.0, elapsed
        assert 'gradflow_last_step{run="r"} 0.0' in body
    finally:
        for s in idle:
            s.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_slowloris_clients_do_not_stall_a_scrape_and_are_cut_off(serve, scheme):
    ep = serve(scheme, connection_timeout_s=2.0)
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    slow = [ep.connect_tls() for _ in range(5)]
    stop = threading.Event()
    cut: list[socket.socket] = []

    def drip():  # one header byte per second and per client, never the end of the headers
        for i in range(len(request)):
            for s in slow:
                if s not in cut:
                    try:
                        s.sendall(request[i:i + 1])
                    except OSError:
                        cut.append(s)
            if stop.wait(1.0):
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        time.sleep(1.2)  # the slow clients have sent a byte or two
        for _ in range(3):
            elapsed, _body = ep.timed_scrape()
            assert elapsed < 1.0, elapsed
        t0 = time.monotonic()
        assert closed_by_server(slow[0], within=4.0)  # its deadline: 2 s after it connected
        assert time.monotonic() - t0 < 3.0
    finally:
        stop.set()
        dripper.join()
        for s in slow:
            s.close()


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_threads_and_connections_stay_bounded(serve, scheme):
    ep = serve(scheme, max_threads=2, max_connections=16)
    before = len(ep.io_threads())
    held = [ep.connect() for _ in range(100)]
    for s in held[50:]:
        s.sendall(b"GET /metr")  # half a request
    try:
        elapsed, _body = ep.timed_scrape()
        assert elapsed < 1.0, elapsed
        # 10 scrapes at once: all answered, by at most 2 worker threads besides the I/O thread.
        results: list[float] = []
        scrapers = [threading.Thread(target=lambda: results.append(ep.timed_scrape()[0])) for _ in range(10)]
        for t in scrapers:
            t.start()
        for t in scrapers:
            t.join()
        assert len(results) == 10
        threads = ep.io_threads()
        assert before <= 3 and len(threads) <= 3, [t.name for t in threads]
        # The oldest connections that had not sent a request made room for the newer ones.
        assert closed_by_server(held[0], within=1.0)
        assert len(ep.server._conns) <= 16
    finally:
        for s in held:
            s.close()


def test_routes_formats_and_methods(serve):
    ep = serve("http")
    with ep.get() as resp:
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert resp.read().decode().endswith("\n") and resp.headers["Connection"] == "close"
    with ep.get(headers={"Accept": "application/openmetrics-text; version=1.0.0"}) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert resp.read().decode().endswith("# EOF\n")
    with ep.get(headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        assert b"gradflow_grad_norm" in gzip.decompress(resp.read())
    with ep.get("/metrics?any=query") as resp:
        assert "gradflow_runs 1.0" in resp.read().decode().splitlines()
    with ep.get("/-/healthy") as resp:
        assert resp.read() == b"OK\n"
    with pytest.raises(urllib.error.HTTPError) as err:
        ep.get("/nope")
    assert err.value.code == 404
    err.value.close()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(ep.url(), data=b"x", method="POST"), timeout=5)
    assert err.value.code == 405
    err.value.close()
    with ep.connect() as s:  # an oversized request head
        s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
        assert s.recv(100).startswith(b"HTTP/1.1 431 ")
    with ep.connect() as s:
        s.sendall(b"garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400 ")


def test_mutual_tls_requires_a_client_certificate(serve, pki):
    ep = serve("https", client_cafile=pki["ca"][0])
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)), ep.get() as resp:
        resp.read()  # TLS 1.3: the server's refusal may arrive after the client's handshake completed
    ep.client_ctx.load_cert_chain(*pki["client"])
    assert ep.timed_scrape()[0] < 1.0
    with pytest.raises(urllib.error.URLError):  # a client that does not trust the server's CA
        urllib.request.urlopen(ep.url(), timeout=5)


def test_shutdown_stops_serving_and_frees_the_port():
    server, thread, port = serve_metrics(aggregator())
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
    idle = socket.create_connection(("127.0.0.1", port))
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert not thread.is_alive()
    assert closed_by_server(idle, within=1.0)
    idle.close()
    again, _t, port2 = serve_metrics(aggregator(), ExporterConfig(port=port))
    try:
        assert port2 == port
    finally:
        again.shutdown()
        again.server_close()
