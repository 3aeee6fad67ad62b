"""Prometheus file-based service discovery: the service writes where it can be scraped, and cleans up after
itself and after owners that died.

``deploy/prometheus/prometheus.yml`` reads the file through ``file_sd_configs``; Prometheus watches it
and follows the service when it restarts on another port or node. The file is replaced atomically
(a temporary file in the same directory, then a rename), so Prometheus never reads half a file.

Every entry names its owner in labels that Prometheus drops after relabelling (``__gfservice_owner_host``,
``__gfservice_owner_pid``, ``__gfservice_owner_start``: the process's boot id and start time, so that a reused
pid is not taken for the owner). :func:`prune_sd_files` removes the entries of this host whose owner is gone:
every :func:`write_sd_file` runs it on its directory first (so the next service or rank 0 cleans up), and so does
``gfservice discovery prune``. :func:`withdraw_on_exit` withdraws an entry at exit, on SIGTERM/SIGINT, and (through
a small watcher process) when its owner is killed outright.

>>> import json, pathlib, tempfile
>>> path = pathlib.Path(tempfile.mkdtemp()) / "sd" / "prometheus-sd.json"
>>> write_sd_file(path, "127.0.0.1:9464")
PosixPath('...prometheus-sd.json')
>>> entry, = json.loads(path.read_text())
>>> entry["targets"], public_labels(entry["labels"]), entry["labels"][OWNER_PID] == str(os.getpid())
(['127.0.0.1:9464'], {'service': 'gfservice'}, True)
>>> prune_sd_files(path.parent)                      # its owner (this process) lives
[]
>>> remove_sd_file(path), path.exists()
(True, False)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from gfservice.config import SD_NAME, default_state_dir
from gfservice.files import atomic_write

__all__ = ["DEFAULT_SD_FILE", "OWNER_HOST", "OWNER_PID", "OWNER_START", "Withdrawal", "owner_labels",
           "process_start", "prune_sd_files", "public_labels", "remove_sd_file", "sd_entries", "stale_reason",
           "withdraw_on_exit", "write_sd_file"]

#: The owner labels (Prometheus drops labels that begin with ``__`` after relabelling).
OWNER_HOST = "__gfservice_owner_host"
OWNER_PID = "__gfservice_owner_pid"
OWNER_START = "__gfservice_owner_start"
#: The largest discovery file :func:`prune_sd_files` reads.
_MAX_SD_BYTES = 1 << 16

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
                  scheme: str = "http", prune: str | bool = True) -> Path:
    """Write (atomically replace) the discovery file at ``path`` for the target ``address`` ("host:port"),
    scraped over ``scheme`` (``"https"`` when the exporter serves TLS), with this process as its owner. First
    removes the stale files of its directory that match ``prune`` (a glob; ``True``: ``STEM*SUFFIX`` of
    ``path``, which covers the rank 0 files beside the service's; ``False``: none)."""
    path = Path(path)
    if prune and path.parent.is_dir():
        glob = prune if isinstance(prune, str) else f"{path.stem}*{path.suffix or '.json'}"
        with contextlib.suppress(OSError):
            prune_sd_files(path.parent, glob)
    text = json.dumps(sd_entries(address, {**dict(labels or {}), **owner_labels()}, scheme), indent=2) + "\n"
    return atomic_write(path, text)  # owner-only, like every file the service writes (SECURITY.md)


def public_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` without the owner labels (what a person reads).

    >>> public_labels({"service": "gfservice", OWNER_PID: "1"})
    {'service': 'gfservice'}
    """
    return {k: v for k, v in labels.items() if not k.startswith("__gfservice_")}


# ---- owners -------------------------------------------------------------------------------------------------
def process_start(pid: int) -> str | None:
    """What tells process ``pid`` from a later one with the same pid: this boot's id and the process's start
    time in clock ticks (Linux ``/proc``); ``None`` when there is no such process or it cannot be read.

    >>> process_start(os.getpid()) == process_start(os.getpid()) is not None
    True
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()  # after "pid (comm) ": field 3 onwards; starttime is field 22
    return f"{boot}:{int(fields[19])}" if len(fields) > 19 else None


def owner_labels(pid: int | None = None) -> dict[str, str]:
    """The owner labels of an entry written by process ``pid`` (default this one)."""
    pid = os.getpid() if pid is None else pid
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(pid), OWNER_START: process_start(pid) or ""}


def stale_reason(labels: Mapping[str, Any]) -> str | None:
    """Why an entry with ``labels`` is stale (its owner, a process of this host, is gone), or ``None`` when its
    owner lives, is on another host, or is not named (such entries are kept).

    >>> stale_reason(owner_labels()) is None
    True
    >>> stale_reason({**owner_labels(), OWNER_START: "another-boot:1"})
    'pid ... now belongs to another process'
    >>> stale_reason({**owner_labels(), OWNER_HOST: "elsewhere"}) is None
    True
    """
    pid = labels.get(OWNER_PID)
    if labels.get(OWNER_HOST) != socket.gethostname() or not isinstance(pid, str) or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return f"its owner, pid {pid}, has exited"
    except (PermissionError, OverflowError, ValueError):
        pass  # alive (another user's) or not a pid at all
    started = process_start(int(pid))
    if labels.get(OWNER_START) and started is not None and started != labels.get(OWNER_START):
        return f"pid {pid} now belongs to another process"
    return None


def _read_entries(path: Path) -> list[dict[str, Any]] | None:
    """The entries of a discovery file of this user (a regular file, not a link), or ``None``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_size > _MAX_SD_BYTES:
            return None
        try:
            data = json.loads(fh.read(_MAX_SD_BYTES))
        except (ValueError, RecursionError):
            return None
    if not isinstance(data, list) or not all(isinstance(e, dict) and isinstance(e.get("labels"), dict)
                                             for e in data):
        return None
    return data


def prune_sd_files(directory: str | os.PathLike, pattern: str = "prometheus-sd*.json",
                   dry_run: bool = False) -> list[tuple[Path, str]]:
    """Remove the discovery files in ``directory`` matching ``pattern`` whose every entry is stale (see
    :func:`stale_reason`); returns what was (``dry_run``: would be) removed, and why. Files of other users,
    links, unreadable files and entries without an owner are left alone."""
    removed: list[tuple[Path, str]] = []
    for path in sorted(Path(directory).glob(pattern)):
        entries = _read_entries(path)
        if not entries:
            continue
        reasons = [stale_reason(e["labels"]) for e in entries]
        if any(r is None for r in reasons):
            continue
        if dry_run or remove_sd_file(path):
            removed.append((path, str(reasons[0])))
    return removed


def remove_sd_file(path: str | os.PathLike) -> bool:
    """Remove the discovery file (the service is going away for good); ``True`` if there was one."""
    try:
        Path(path).unlink()
        return True
    except FileNotFoundError:
        return False


# ---- withdrawing an entry when its owner goes ---------------------------------------------------------------
#: The watcher: waits until its owner closes the pipe (it exited, however) or signals it, then removes the
#: file if it still names the owner. Plain Python, no imports of gfservice: it starts in a few milliseconds.
_WATCHER = """
import json, os, select, signal, sys
path, pid = sys.argv[1], sys.argv[2]
def withdraw(*_):
    try:
        with open(path) as fh:
            if all(e.get("labels", {}).get("__gfservice_owner_pid") == pid for e in json.load(fh)):
                os.unlink(path)
    except Exception:
        pass
    os._exit(0)
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, withdraw)
while True:
    ready, _, _ = select.select([0], [], [], 1.0)
    if ready and not os.read(0, 64):
        withdraw()
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        withdraw()
"""


class Withdrawal:
    """Withdraws one discovery file when its owner goes: at :meth:`withdraw` (idempotent), at exit, on
    SIGTERM/SIGINT (handlers chained before the ones already set: never replaced, and installed only from the
    main thread), and through a watcher process when the owner is killed outright (SIGKILL, the OOM killer)."""

    def __init__(self, path: Path, watcher: bool = True):
        self.path = path
        self._done = threading.Event()
        self._previous: dict[int, Any] = {}
        self._watcher: subprocess.Popen[bytes] | None = None
        import atexit

        atexit.register(self.withdraw)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(ValueError, OSError):
                    self._previous[sig] = signal.signal(sig, self._on_signal)
        if watcher:
            with contextlib.suppress(OSError):
                self._watcher = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _WATCHER, str(path), str(os.getpid())],
                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                    start_new_session=True)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.withdraw()
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:  # what would have happened: the default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def withdraw(self) -> None:
        """Remove the file (once), stop the watcher, and put back the signal handlers that were there."""
        if self._done.is_set():
            return
        self._done.set()
        remove_sd_file(self.path)
        if self._watcher is not None and self._watcher.stdin is not None:
            with contextlib.suppress(OSError):
                self._watcher.stdin.close()  # it sees the end, finds the file gone, and exits
            with contextlib.suppress(Exception):
                self._watcher.wait(timeout=2)
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                with contextlib.suppress(ValueError, OSError, TypeError):
                    if signal.getsignal(sig) == self._on_signal:
                        signal.signal(sig, previous)


def withdraw_on_exit(path: str | os.PathLike, watcher: bool = True) -> Withdrawal:
    """Withdraw the discovery file ``path`` however this process ends (see :class:`Withdrawal`)."""
    return Withdrawal(Path(path), watcher)

