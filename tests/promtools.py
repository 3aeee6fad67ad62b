"""Test harness around the real Prometheus tools, on 127.0.0.1 only: find the binaries, pick free ports,
start ``prometheus`` and ``prometheus-alertmanager`` in a temporary directory, receive webhooks, query.

Typical use (see ``tests/test_alerting_e2e.py``)::

    with WebhookReceiver() as hook, \\
         start_alertmanager(tmp / "am", hook.url) as am, \\
         start_prometheus(tmp / "prom", sd_file=sd, rule_files=[rules], alertmanager_url=am.url) as prom:
        wait_until(lambda: query(prom.url, 'up{job="gfservice"}'), timeout=20)
        payload = hook.wait_for(lambda p: p["status"] == "firing", timeout=20)

A missing binary fails the test (never skips) with the command that installs it.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

HOST = "127.0.0.1"
INSTALL_HINT = "apt-get install -y prometheus prometheus-alertmanager"


def find_binary(*names: str) -> str:
    """Path of the first of ``names`` on PATH (or in /usr/bin); fails the test with an install hint."""
    for name in names:
        path = shutil.which(name) or (f"/usr/bin/{name}" if os.access(f"/usr/bin/{name}", os.X_OK) else None)
        if path:
            return path
    pytest.fail(f"{' / '.join(names)} not found: install it with `{INSTALL_HINT}`", pytrace=False)


def prometheus_bin() -> str:
    return find_binary("prometheus")


def promtool_bin() -> str:
    return find_binary("promtool")


def alertmanager_bin() -> str:
    return find_binary("prometheus-alertmanager", "alertmanager")


def amtool_bin() -> str:
    return find_binary("amtool")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS says is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # not up yet
            last_exc = exc
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout} s waiting for {what or predicate}" +
                (f" (last error: {last_exc})" if last_exc else ""), pytrace=False)


def http_get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def query(prom_url: str, expr: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Instant query; returns Prometheus' ``result`` list (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
    url = f"{prom_url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(http_get(url, timeout))
    if body.get("status") != "success":
        raise RuntimeError(f"query {expr!r} failed: {body}")
    return body["data"]["result"]


@dataclass
class Process:
    """A started binary: its URL, process, working directory and log file; ``stop()`` ends it."""

    name: str
    url: str
    port: int
    proc: subprocess.Popen
    workdir: Path
    log: Path
    config: Path

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start(name: str, argv: list[str], workdir: Path, port: int, config: Path, ready_path: str,
           timeout: float) -> Process:
    log = workdir / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=workdir)
    p = Process(name, f"http://{HOST}:{port}", port, proc, workdir, log, config)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{p.log_tail()}")
        try:
            http_get(p.url + ready_path, timeout=1.0)
            return True
        except OSError:
            return False

    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout} s:\n{p.log_tail()}")
            time.sleep(0.05)
    except BaseException:
        p.stop()
        raise
    return p


def start_prometheus(
    tmpdir: str | os.PathLike,
    scrape_targets: Sequence[str] = (),
    sd_file: str | os.PathLike | None = None,
    rule_files: Sequence[str | os.PathLike] = (),
    alertmanager_url: str | None = None,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    job: str = "gfservice",
    timeout: float = 30.0,
) -> Process:
    """Start ``prometheus`` on a free 127.0.0.1 port, scraping ``scrape_targets`` ("host:port") and/or the
    targets of the file_sd ``sd_file`` as job ``job``, evaluating ``rule_files``, alerting ``alertmanager_url``."""
    workdir = Path(tmpdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    scrape: dict[str, Any] = {"job_name": job, "scrape_interval": scrape_interval,
                              "scrape_timeout": scrape_interval}
    if scrape_targets:
        scrape["static_configs"] = [{"targets": list(scrape_targets)}]
    if sd_file is not None:
        scrape["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": [str(Path(r).resolve()) for r in rule_files],
        "scrape_configs": [scrape],
    }
    if alertmanager_url:
        am = urllib.parse.urlparse(alertmanager_url)
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [am.netloc]}]}]}
    cfg = workdir / "prometheus.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        prometheus_bin(),
        f"--config.file={cfg}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={HOST}:{port}",
        "--log.level=warn",
    ]
    return _start("prometheus", argv, workdir, port, cfg, "/-/ready", timeout)


def start_alertmanager(
    tmpdir: str | os.PathLike,
    webhook_url: str,
    group_wait: str = "0s",
    group_interval: str = "1s",
    repeat_interval: str = "1h",
    group_by: Sequence[str] = ("alertname", "run"),
    timeout: float = 30.0,
) -> Process:
    """Start the Alertmanager on a free 127.0.0.1 port (clustering off), sending every alert, firing and
    resolved, to ``webhook_url`` at once."""
    workdir = Path(tmpdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "route": {
            "receiver": "hook",
            "group_by": list(group_by),
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": repeat_interval,
        },
        "receivers": [{"name": "hook", "webhook_configs": [{"url": webhook_url, "send_resolved": True}]}],
    }
    cfg = workdir / "alertmanager.yml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [
        alertmanager_bin(),
        f"--config.file={cfg}",
        f"--storage.path={workdir / 'data'}",
        f"--web.listen-address={HOST}:{port}",
        "--cluster.listen-address=",  # no gossip port on other interfaces
        "--log.level=warn",
    ]
    return _start("alertmanager", argv, workdir, port, cfg, "/-/ready", timeout)


@dataclass
class Delivery:
    """One webhook request: when it arrived (``time.time()``), its path and its JSON payload."""

    received: float
    path: str
    payload: dict[str, Any]


@dataclass
class WebhookReceiver:
    """A tiny HTTP server on 127.0.0.1 that records every JSON POST (Alertmanager's webhook payloads)."""

    deliveries: list[Delivery] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    payload = json.loads(body or b"{}")
                except json.JSONDecodeError:
                    payload = {"_raw": body.decode(errors="replace")}
                with outer._cond:
                    outer.deliveries.append(Delivery(time.time(), self.path, payload))
                    outer._cond.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://{HOST}:{self.port}/hook"
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook", daemon=True)
        self._thread.start()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30.0) -> Delivery:
        """The first delivery whose payload satisfies ``predicate``, waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for d in self.deliveries:
                    if predicate(d.payload):
                        return d
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no matching webhook within {timeout} s; got {[d.payload for d in self.deliveries]}",
                                pytrace=False)
                self._cond.wait(left)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_tool(argv: Sequence[str], stdin: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run a tool (promtool, amtool) and return the completed process (text output, not checked)."""
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def stopping(*procs: Process):
    """Stop ``procs`` on exit, whatever happens."""
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()
