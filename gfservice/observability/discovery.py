"""Prometheus file-based service discovery: the service writes where it can be scraped.

``deploy/prometheus/prometheus.yml`` reads the file through ``file_sd_configs``; Prometheus watches it
and follows the service when it restarts on another port or node. The file is replaced atomically
(a temporary file in the same directory, then a rename), so Prometheus never reads half a file.

>>> import json, pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "sd" / "prometheus-sd.json"
>>> write_sd_file(path, "127.0.0.1:9464")
PosixPath('...prometheus-sd.json')
>>> json.loads(path.read_text())
[{'targets': ['127.0.0.1:9464'], 'labels': {'service': 'gfservice'}}]
>>> remove_sd_file(path), path.exists()
(True, False)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from gfservice.config import SD_NAME, default_state_dir
from gfservice.files import atomic_write

__all__ = ["DEFAULT_SD_FILE", "remove_sd_file", "sd_entries", "write_sd_file"]

#: Where the service writes its discovery file unless told otherwise (inside its private state directory:
#: ``$XDG_STATE_HOME/gfservice``, else ``~/.local/state/gfservice``); deploy/prometheus/prometheus.yml reads it.
DEFAULT_SD_FILE = str(default_state_dir() / SD_NAME)


def sd_entries(address: str, labels: Mapping[str, str] | None = None, scheme: str = "http") -> list[dict]:
    """The file_sd content for one target ``host:port``; an HTTPS endpoint (``scheme="https"``) carries the
    ``__scheme__`` label, which tells Prometheus to scrape it over TLS.

    >>> sd_entries("127.0.0.1:1", {"cluster": "a"})
    [{'targets': ['127.0.0.1:1'], 'labels': {'service': 'gfservice', 'cluster': 'a'}}]
    >>> sd_entries("gpu-node-3:9464", scheme="https")
    [{'targets': ['gpu-node-3:9464'], 'labels': {'service': 'gfservice', '__scheme__': 'https'}}]
    >>> sd_entries("nohost")
    Traceback (most recent call last):
    ...
    ValueError: address must be host:port, got 'nohost'
    """
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be host:port, got {address!r}")
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https, got {scheme!r}")
    tls = {"__scheme__": "https"} if scheme == "https" else {}
    return [{"targets": [address], "labels": {"service": "gfservice", **dict(labels or {}), **tls}}]


def write_sd_file(path: str | os.PathLike, address: str, labels: Mapping[str, str] | None = None,
                  scheme: str = "http") -> Path:
    """Write (atomically replace) the discovery file at ``path`` for the target ``address`` ("host:port"),
    scraped over ``scheme`` (``"https"`` when the exporter serves TLS)."""
    text = json.dumps(sd_entries(address, labels, scheme), indent=2) + "\n"
    return atomic_write(path, text)  # owner-only, like every file the service writes (SECURITY.md)


def remove_sd_file(path: str | os.PathLike) -> bool:
    """Remove the discovery file (the service is going away for good); ``True`` if there was one."""
    try:
        Path(path).unlink()
        return True
    except FileNotFoundError:
        return False
