"""The life of a finding in the aggregator: raised by a detector, seen again on later steps, cleared when its
detector stops reporting it; and the ``detector_disabled`` findings of detectors past their budgets.

A :class:`Record` keeps a finding as first raised plus its lifecycle; callers only ever get copies.

>>> from gfservice.api import Finding, Severity
>>> f = Finding(detector="nonfinite", severity=Severity.warning, run="r", step=3, message="NaN")
>>> rec = Record.new(f, step=3)
>>> rec.seen(f.model_copy(update={"severity": Severity.critical, "value": 2.0}), step=5)
>>> c = rec.copy()
>>> (c.first_step, c.last_step, c.occurrences, c.severity.value, c.value)
(3, 5, 2, 'critical', 2.0)
>>> Record.from_finding(c).copy() == c
True
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gfservice.api import Finding, Severity, StepStats
from gfservice.config import AggregatorConfig
from gfservice.service.runs import Run, log
from gfservice.wire import DisableReason

if TYPE_CHECKING:
    from gfservice.service.judging import Outcome

__all__ = ["DETECTOR_DISABLED", "ERROR_LOG_INTERVAL_S", "ErrorLog", "Record", "clear", "clear_all", "disable",
           "log_error", "settle"]

#: The detector name of the finding that says a detector was disabled for a run (its key: that detector's name).
DETECTOR_DISABLED = "detector_disabled"
#: Seconds between the summary lines of a detector's repeated errors on one run (the first one logs in full).
ERROR_LOG_INTERVAL_S = 60.0


@dataclass(eq=False)


class Record:
    """The aggregator's record of one finding: as first raised, and its lifecycle since."""

    raised: Finding
    first_step: int
    last_step: int
    severity: Severity
    value: float | None
    occurrences: int = 1
    active: bool = True
    cleared_time: float | None = None
    #: The run's detector configuration version when it was first raised (0: as started; see ``configure``).
    config: int = 0
    #: The attempt of the run in which it was first raised.
    attempt: str = ""

    @classmethod
    def new(cls, f: Finding, step: int, config: int = 0, attempt: str = "") -> Record:
        return cls(f, step, step, f.severity, f.value, config=config, attempt=attempt)

    def seen(self, f: Finding, step: int) -> None:
        self.last_step = step
        self.value = f.value
        self.occurrences += 1
        if f.severity.rank > self.severity.rank:
            self.severity = f.severity

    def copy(self) -> Finding:
        """The finding as first raised, with its lifecycle filled in: an immutable copy for callers."""
        return self.raised.model_copy(update={
            "first_step": self.first_step, "last_step": self.last_step, "severity": self.severity,
            "value": self.value, "occurrences": self.occurrences, "active": self.active,
            "cleared_time": self.cleared_time, "config": self.config, "attempt": self.attempt,
        })

    @classmethod
    def from_finding(cls, f: Finding) -> Record:
        """The record of a copy made by :meth:`copy` (a saved finding)."""
        raised = f.model_copy(update={"first_step": None, "last_step": None, "occurrences": 1, "active": True,
                                      "cleared_time": None, "config": 0, "attempt": ""})
        return cls(raised, f.since, f.last_step if f.last_step is not None else f.since, f.severity, f.value,
                   f.occurrences, f.active, f.cleared_time, f.config, f.attempt)


@dataclass(eq=False)


class ErrorLog:
    """The rate limit of one detector's error logs on one run: the current window and what it has not logged."""

    #: Start of the current window (``time.monotonic``).
    since: float
    #: Errors not logged in the window, and the last of them.
    unlogged: int = 0
    last: str = ""


def settle(run: Run, stats: StepStats, outcomes: Sequence[Outcome], config: AggregatorConfig,
           now: float) -> list[Finding]:
    """Take the detectors' outcomes on ``stats`` into the run's findings (caller holds ``run.lock``); returns
    copies of the findings raised anew."""
    raised: dict[tuple[str, str], Finding] = {}
    silent: set[str] = {DETECTOR_DISABLED}
    budget = config.detector_error_budget
    health = run.health
    for o in outcomes:
        health.seconds[o.name] = health.seconds.get(o.name, 0.0) + o.seconds
        if o.found is not None:
            for f in o.found:
                raised[f.identity] = f
            continue
        silent.add(o.name)  # no verdict on this step: its findings stay as they are
        if o.timed_out:
            health.errors[o.name] = health.errors.get(o.name, 0) + 1
            why = (f"it took more than its time budget of {config.detector_time_budget_s:g} s "
                   f"(detector_time_budget_s) on step {stats.step}")
            f = disable(run, stats, o.name, DisableReason.time, why)
            raised[f.identity] = f
        elif o.error is not None:
            health.errors[o.name] = health.errors.get(o.name, 0) + 1
            health.strikes[o.name] = health.strikes.get(o.name, 0) + 1
            log_error(run, o.name, stats.step, o.error)
            if health.strikes[o.name] >= budget:
                why = (f"{health.strikes[o.name]} errors, its budget (detector_error_budget); the last: "
                       f"{type(o.error).__name__}: {o.error}")
                f = disable(run, stats, o.name, DisableReason.errors, why)
                raised[f.identity] = f
    silent.update(health.disabled)
    new: list[Finding] = []
    for ident, f in raised.items():
        rec = run.active.get(ident)
        if rec is not None:  # still active: the finding as first raised, seen again at this step
            rec.seen(f, stats.step)
            continue
        rec = Record.new(f, stats.step, len(run.config_changes), run.attempt)
        run.active[ident] = rec
        run.log.append(rec)
        key = (f.detector, f.severity.value)
        run.findings_total[key] = run.findings_total.get(key, 0) + 1
        new.append(rec.copy())
        judge = run.detectors.get(f.detector)
        if judge is not None and judge.config.stop_run and run.stop_reason is None:
            run.stop_reason = f"{f.detector}: {f.message}"
    for ident in [i for i in run.active if i not in raised and i[0] not in silent]:
        clear(run, ident, now)
    return new


def clear(run: Run, ident: tuple[str, str], now: float) -> None:
    """Clear the active finding ``ident`` of ``run`` at ``now`` (caller holds ``run.lock``)."""
    rec = run.active.pop(ident)
    rec.active = False
    rec.cleared_time = now
    run.cleared.append(rec)


def clear_all(run: Run, now: float) -> None:
    """Clear every active finding of ``run`` (a new attempt: its detectors raise again what still holds)."""
    for rec in run.active.values():
        rec.active = False
        rec.cleared_time = now
        run.cleared.append(rec)
    run.active.clear()


def disable(run: Run, stats: StepStats, name: str, reason: DisableReason, why: str) -> Finding:
    """Disable detector ``name`` for ``run``; returns the ``detector_disabled`` finding that says so."""
    run.health.disabled[name] = reason
    run.health.strikes.pop(name, None)
    log.warning("detector %s is disabled for run %s: %s", name, run.name, why)
    return Finding(
        detector=DETECTOR_DISABLED, severity=Severity.warning, run=stats.run, step=stats.step, key=name,
        message=f"detector {name} is disabled for this run: {why}. Its findings are no longer updated; fix or "
                f"remove the plugin, then re-enable it with `gfservice configure {run.name} --set "
                f"{name}.enabled=true` or by restarting the service.",
    )


def log_error(run: Run, name: str, step: int, exc: BaseException) -> None:
    """Log a detector's first error on ``run`` in full; later ones as one summary line a minute."""
    now = time.monotonic()
    entry = run.health.error_log.get(name)
    if entry is None:
        run.health.error_log[name] = ErrorLog(now)
        log.error("detector %s failed on run %s step %d (later errors of it on this run are summarised "
                  "once a minute)", name, run.name, step, exc_info=exc)
        return
    entry.unlogged += 1
    entry.last = f"{type(exc).__name__}: {exc}"
    if now - entry.since >= ERROR_LOG_INTERVAL_S:
        log.error("detector %s failed %d more times on run %s in the last %.0f s (the last at step %d: %s)",
                  name, entry.unlogged, run.name, now - entry.since, step, entry.last)
        entry.since, entry.unlogged = now, 0
