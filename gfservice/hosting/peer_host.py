"""What rank 0 of a torchrun or Slurm job runs without Ray: the job's aggregator, fed by every rank through a
:class:`~gfservice.service.peer_server.PeerServer`, with ``/metrics`` and its Prometheus discovery entry (which is
withdrawn however rank 0 ends: :func:`~gfservice.observability.discovery.withdraw_on_exit`; writing it first
removes the entries of this host's dead jobs).

>>> from gfservice.config import Settings
>>> host = PeerHost(Settings(service={"sd_file": ""}), announce=lambda line: None)
>>> host.server.address.startswith("127.0.0.1:"), host.metrics_url.endswith("/metrics")
(True, True)
>>> host.close()
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

from gfservice.config import Settings
from gfservice.hosting.scrape import scrape_host
from gfservice.observability.discovery import Withdrawal, withdraw_on_exit, write_sd_file
from gfservice.observability.exporter import serve_metrics
from gfservice.service.aggregator import Aggregator
from gfservice.service.peer_server import PeerServer
from gfservice.service.state import ensure_private_dir

__all__ = ["PeerHost"]

log = logging.getLogger(__name__)


class PeerHost:
    """What rank 0 runs for its job: the aggregator, the :class:`~gfservice.service.peer_server.PeerServer` on
    ``bind``, and ``/metrics`` (``[service] metrics_port``/``metrics_addr``; default a free port on 127.0.0.1)
    with its Prometheus discovery entry: ``prometheus-sd-<tag>.json`` beside ``[service] sd_file`` (so that it
    never replaces the service's own; ``""`` disables it). The metrics URL is printed once to stderr.
    ``watch``: also start the watcher process that withdraws the entry if rank 0 is killed outright.
    """

    def __init__(self, settings: Settings, bind: str = "127.0.0.1", token: str | None = None, tag: str = "peer",
                 announce: Callable[[str], None] | None = None, watch: bool = True):
        cfg = settings.service
        self.aggregator = Aggregator(settings.aggregator, settings.detectors)
        self.server = PeerServer(self.aggregator, bind, 0, token, cfg.tick_interval_s)
        exp = cfg.exporter_config(cfg.metrics_port if cfg.metrics_port is not None else 0)
        try:
            self._metrics, _thread, self.metrics_port = serve_metrics(self.aggregator, exp)
        except BaseException:
            self.server.close()
            raise
        host = scrape_host(cfg.metrics_addr, cfg.advertise_addr)
        scheme = "https" if exp.certfile else "http"
        self.metrics_url = f"{scheme}://{host}:{self.metrics_port}/metrics"
        self.sd_file: Path | None = None
        self._withdrawal: Withdrawal | None = None
        if cfg.sd_file:
            self.sd_file = _write_sd(Path(cfg.sd_file), tag, f"{host}:{self.metrics_port}", scheme)
        if self.sd_file is not None:
            self._withdrawal = withdraw_on_exit(self.sd_file, watcher=watch)
        (announce or _stderr)(f"gfservice: rank 0 aggregates this job's ranks (peers connect to "
                              f"{self.server.address}); metrics at {self.metrics_url}"
                              + (f", discovery file {self.sd_file}" if self.sd_file else ""))

    def close(self) -> None:
        """Stop serving and withdraw the discovery entry."""
        self.server.close()
        self._metrics.shutdown()
        self._metrics.server_close()
        if self._withdrawal is not None:
            self._withdrawal.withdraw()
        self.aggregator.flush()


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _write_sd(base: Path, tag: str, address: str, scheme: str) -> Path | None:
    path = base.with_name(f"{base.stem}-{tag}{base.suffix or '.json'}")
    try:
        ensure_private_dir(path.parent)
        return write_sd_file(path, address, {"launcher": "torchrun"}, scheme=scheme,
                             prune=f"{base.stem}*{base.suffix or '.json'}")
    except Exception as exc:  # monitoring goes on without discovery
        log.warning("gfservice: could not write the discovery file %s: %s", path, exc)
        return None
