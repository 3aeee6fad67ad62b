"""Where Prometheus should scrape a host's ``/metrics``: the advertised address, else the bound one.

>>> scrape_host("127.0.0.1", None), scrape_host("0.0.0.0", "gf.example.internal"), scrape_host("::1", None)
('127.0.0.1', 'gf.example.internal', '[::1]')
"""

from __future__ import annotations

import socket

__all__ = ["scrape_host"]


def scrape_host(addr: str, advertise: str | None) -> str:
    """``advertise`` when set, else ``addr`` (this host's address when ``addr`` is a wildcard); an IPv6 address
    in brackets, ready for ``host:port``."""
    host = advertise or addr
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostbyname(socket.gethostname())
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
