"""The long-lived service's core: an aggregator with durable snapshots and a merge ticker, in plain Python.

:class:`ServiceCore` is what the Ray actor runs (:mod:`gfservice.hosting.actor` adds ``/metrics``, the
discovery file and the token guard around it): it takes batches, answers queries, writes a snapshot in the
background when something worth keeping changed, and restores the latest good one when it starts.

>>> core = ServiceCore()
>>> core.submit([{"kind": "nope"}]).plain()
{'rejected': [[0, 'unknown_kind']], 'stop': {}}
>>> core.status().restored_runs, core.status().metrics
(0, None)
>>> core.shutdown()
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gfservice._version import __version__
from gfservice.api import Finding, StepStats
from gfservice.config import Settings
from gfservice.envelopes import BatchAnswer, ServiceStatus, SnapshotHealth
from gfservice.service.aggregator import Aggregator
from gfservice.service.ingest import take
from gfservice.service.state import (
    SnapshotError,
    StateDirError,
    ensure_private_dir,
    prev_path,
    read_snapshot,
    set_aside,
    write_snapshot,
)

__all__ = ["ServiceCore"]

log = logging.getLogger(__name__)


class ServiceCore:
    """The service's state and behaviour, without Ray and without ``/metrics``: the hosts wrap it
    (:mod:`gfservice.hosting.actor`). ``settings.service.metrics_port`` is theirs to serve; :attr:`metrics_address`
    is what they tell ``status()``.

    It always starts, but on a state directory that is not private (:class:`~gfservice.service.state.StateDirError`,
    a configuration to fix) or a snapshot of a newer gfservice: a snapshot that cannot be read or restored is set
    aside and the core starts empty; a state disk that is full or read-only costs durability, never the start
    (counted in ``snapshot_failures``, exported). ``clock`` and ``monotonic`` are the aggregator's
    (:class:`~gfservice.service.aggregator.Aggregator`: the wall clock only stamps, the monotonic one decides).
    """

    def __init__(self, settings: dict[str, Any] | Settings | None = None, *,
                 clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic):
        # Validated again here (the driver validated it too): no environment is read inside the actor.
        self.settings = Settings.model_validate(settings.model_dump() if isinstance(settings, Settings)
                                                else settings or {})
        self._clock, self._monotonic = clock, monotonic
        #: Snapshot writes that failed, the state directory's failures at start included (all time), and when the
        #: last write succeeded (exported to Prometheus); snapshots set aside as unusable.
        self.snapshot_failures = 0
        self.snapshot_last_success: float | None = None
        self.snapshots_set_aside = 0
        self._failure_burst = 0
        cfg = self.settings.service
        for file in (cfg.snapshot_path, cfg.sd_file):  # private directories, or a clear error before anything
            if file:
                try:
                    ensure_private_dir(Path(file).expanduser().parent)
                except StateDirError:
                    raise
                except OSError as exc:  # a full or read-only disk: the service runs without durable state
                    self.state_disk_failed(f"cannot create the directory of {file}", exc)
        self.aggregator = self._new_aggregator()
        self._started = monotonic()
        self.restored = self._restore()
        self._snapshot_lock = threading.Lock()
        self._snapshot_wanted = threading.Event()
        self._last_snapshot_accepted = -1
        #: ``host:port`` of the ``/metrics`` a host serves for this core, for ``status()``; ``None``: none.
        self.metrics_address: str | None = None
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick_loop, name="gfservice-ticker", daemon=True)
        self._ticker.start()
        self._writer = threading.Thread(target=self._write_loop, name="gfservice-snapshots", daemon=True)
        self._writer.start()

    # ---- ingest ---------------------------------------------------------------------------------
    def submit(self, messages: list[Any], dropped: dict[str, int] | None = None) -> BatchAnswer:
        """Take a batch of messages (of any runs) and the drops of their senders by run; answers the rejections
        and the stop verdict of every run the messages name."""
        if not isinstance(messages, list | tuple):
            messages = [messages]
        answer, found = take(self.aggregator, messages, dropped)
        if found:
            self.request_snapshot()  # findings are rare and must survive a restart
        return answer

    # ---- queries --------------------------------------------------------------------------------
    def ping(self) -> str:
        return "pong"

    def runs(self) -> list[dict[str, Any]]:
        return self.aggregator.runs()

    def findings(self, run: str, since_step: int = 0, active_only: bool = False) -> list[Finding]:
        return self.aggregator.findings(run, since_step, active_only)

    def latest(self, run: str) -> StepStats | None:
        return self.aggregator.latest(run)

    def history(self, run: str) -> list[StepStats]:
        return self.aggregator.history(run)

    def configure(self, run: str, settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Change the detectors of the live ``run`` (see :meth:`Aggregator.configure`); saved at once (in the
        background)."""
        summary = self.aggregator.configure(run, settings)
        if summary["changed"]:
            self.request_snapshot()  # the change must survive a restart of the service
        return summary

    def status(self) -> ServiceStatus:
        """Runs, counters and where the service can be scraped."""
        counters = self.aggregator.counters()
        return ServiceStatus(
            version=__version__,
            pid=os.getpid(),
            uptime_s=self._monotonic() - self._started,
            restored_runs=self.restored,
            snapshot=self.snapshot_health(),
            metrics=self.metrics_address,
            counters={**counters, "snapshots_set_aside": self.snapshots_set_aside,
                      "snapshot_failures": self.snapshot_failures},
            runs=[{**r.row(), "active": [f.model_dump(exclude={"time"}) for f in r.active]}
                  for r in self.aggregator.view().runs],
        )

    # ---- background work ------------------------------------------------------------------------
    def _tick_loop(self) -> None:
        cfg = self.settings.service
        last_snap = time.monotonic()
        while not self._stop.wait(cfg.tick_interval_s):
            try:
                if self.aggregator.tick():
                    self.request_snapshot()
                if time.monotonic() - last_snap >= cfg.snapshot_interval_s:
                    last_snap = time.monotonic()
                    if self.aggregator.accepted != self._last_snapshot_accepted:
                        self.request_snapshot()
            except Exception:
                log.exception("gfservice ticker failed; continuing")

    def request_snapshot(self) -> None:
        """Ask the writer thread for a snapshot; requests made while it writes coalesce into one more write."""
        self._snapshot_wanted.set()

    def _write_loop(self) -> None:
        while True:
            self._snapshot_wanted.wait()
            if self._stop.is_set():
                return
            self._snapshot_wanted.clear()
            self.snapshot()

    def snapshot(self) -> bool:
        """Save detector state and findings to ``snapshot_path`` now (atomically, fsynced; the previous one is
        kept). Never raises: a failure is counted, logged once per burst and exported. Returns success."""
        path = self.settings.service.snapshot_path
        if not path:
            return True
        with self._snapshot_lock:
            accepted = self.aggregator.accepted
            try:
                state = self.aggregator.state_dict()  # copied under the aggregator's lock; written without it
                write_snapshot(path, state)
            except Exception as exc:
                self.snapshot_failures += 1
                self._failure_burst += 1
                if self._failure_burst == 1:
                    log.error("gfservice could not save its snapshot to %s: %s (%s); submits are still taken, "
                              "retrying; failures are counted in gradflow_snapshot_failures_total",
                              path, exc, type(exc).__name__)
                return False
            if self._failure_burst:
                log.warning("gfservice saved its snapshot to %s again after %d failed attempts", path,
                            self._failure_burst)
            self._failure_burst = 0
            self.snapshot_last_success = time.time()
            self._last_snapshot_accepted = accepted
            return True

    def state_disk_failed(self, what: str, exc: BaseException) -> None:
        """Count and log a failure of the state disk that the service starts regardless of."""
        self.snapshot_failures += 1
        log.error("gfservice: %s: %s (%s); the service runs on without it (counted in "
                  "gradflow_snapshot_failures_total): free or fix the state disk ([service] state_dir)",
                  what, exc, type(exc).__name__)

    def _new_aggregator(self) -> Aggregator:
        return Aggregator(self.settings.aggregator, self.settings.detectors, clock=self._clock,
                          monotonic=self._monotonic)

    def _set_aside(self, candidate: Path, why: str) -> None:
        self.snapshots_set_aside += 1
        set_aside(candidate, why)

    def snapshot_health(self) -> SnapshotHealth:
        """What the exporter publishes about snapshots (read at scrape time)."""
        return SnapshotHealth(last_success=self.snapshot_last_success, failures=float(self.snapshot_failures))

    def _restore(self) -> int:
        """Restore the latest snapshot, else the previous one, into a fresh aggregator swapped in on success.

        A snapshot that cannot be read or restored is set aside (``*.corrupt-<time>.json``), never overwritten;
        one from a newer gfservice stops the service (:class:`~gfservice.service.state.SnapshotTooNew`)."""
        path = self.settings.service.snapshot_path
        if not path:
            return 0
        failed = []
        target = Path(path).expanduser()
        with contextlib.suppress(OSError):
            for stale in target.parent.glob(f".{target.name}.*.tmp"):  # a write cut short by a crash
                with contextlib.suppress(OSError):
                    stale.unlink()
        for candidate in (target, prev_path(target)):
            try:
                doc = read_snapshot(candidate)
            except FileNotFoundError:
                continue
            except (SnapshotError, OSError, MemoryError, RecursionError) as exc:
                self._set_aside(candidate, f"{type(exc).__name__}: {exc}")
                failed.append(candidate)
                continue
            fresh = self._new_aggregator()
            try:
                fresh.load_state_dict(doc["state"])
                fresh.view()  # what every reader builds: a state it cannot show is no state to start from
            except Exception as exc:
                log.exception("gfservice could not restore %s", candidate)
                self._set_aside(candidate, f"could not be restored: {type(exc).__name__}: {exc}")
                failed.append(candidate)
                continue
            self.aggregator = fresh
            runs = doc["state"].get("runs", {})
            findings = sum(len(r.get("log", [])) + len(r.get("active", [])) for r in runs.values())
            active = len([f for r in fresh.view().runs for f in r.active])
            names = ", ".join(sorted(runs)[:20]) + (", ..." if len(runs) > 20 else "")
            log.warning("gfservice restored %d runs (%s) with %d findings (%d active) from %s%s, saved at %s",
                        len(runs), names, findings, active, candidate, " (the previous snapshot)" if failed else "",
                        _when(doc.get("time")))
            return len(runs)
        if failed:
            log.error("gfservice found no usable snapshot (set aside: %s); starting empty",
                      ", ".join(map(str, failed)))
        return 0

    def shutdown(self) -> None:
        """Stop background work and save a last snapshot (a deliberate stop)."""
        self._stop.set()
        self._snapshot_wanted.set()  # wakes the writer, which ends
        self._writer.join(timeout=30)
        self.aggregator.flush()
        self.snapshot()


def _when(t: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, int | float) else "?"
