"""Snapshots: the aggregator's state as plain data (detector state, findings and layouts of every run, not
the step history: enough to resume), and back. :mod:`gfservice.service.state` writes it to disk as JSON; a
state to load is validated as a whole (:class:`~gfservice.saved.SnapshotState`: types, sizes, nesting) before
anything of it is taken, and its layouts are checked like live ones.

>>> from gfservice.service.aggregator import Aggregator
>>> agg = Aggregator()
>>> _ = agg.submit({"kind": "layout", "run": "r", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [4],
...                 "sharded": [False]})
>>> _ = agg.submit({"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": {"count": [4],
...                 "sum_sq": [float("nan")], "max_abs": [float("nan")], "nonfinite": [4]}})
>>> restored = Aggregator()
>>> restored.load_state_dict(agg.state_dict())
>>> [f.detector for f in restored.active_findings("r")]
['nonfinite']
>>> restored.load_state_dict({"runs": {"bad": {"world_size": 0}}})
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: ...
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from gfservice.api import Detector
from gfservice.errors import ConfigError
from gfservice.saved import SnapshotState
from gfservice.service.admission import new_run, register
from gfservice.service.findings import DETECTOR_DISABLED, Record, clear
from gfservice.service.reconfigure import apply, plan
from gfservice.service.runs import Run, Table, log
from gfservice.service.state import encode_detector_state
from gfservice.service.view import publish
from gfservice.wire import Layout, Rejected, parse

__all__ = ["SNAPSHOT_WAIT_S", "detector_state", "layouts_state", "load_state_dict", "run_state", "state_dict"]

#: Seconds a snapshot waits for a run busy judging a step before it keeps that run's previous detector states.
SNAPSHOT_WAIT_S = 0.1


def state_dict(table: Table) -> dict[str, Any]:
    """Detector state, findings and layouts of every run of ``table`` (not the step history): enough to resume.

    Never breaks on one run: a detector whose state cannot be saved is left out (it starts fresh on
    restore), and a run still busy judging a step after a short wait keeps the detector states of its last
    snapshot. Disabled detectors are left out too.
    """
    with table.lock:
        runs = list(table.runs.values())
        accepted, rejected = table.accepted, dict(table.rejected)
    return {"runs": {r.name: run_state(r) for r in runs}, "accepted": accepted, "rejected": rejected}


def run_state(r: Run) -> dict[str, Any]:
    judging = r.judging.acquire(timeout=SNAPSHOT_WAIT_S)
    try:
        with r.lock:
            if judging:
                r.saved_detectors = {n: s for n, d in r.detectors.items() if n not in r.health.disabled
                                     if (s := detector_state(r, n, d)) is not None}
            else:
                log.warning("run %s is busy judging a step: its snapshot keeps the detector states of the "
                            "previous one", r.name)
            return run_state_locked(r)
    finally:
        if judging:
            r.judging.release()


def detector_state(r: Run, name: str, det: Detector) -> dict[str, Any] | None:
    """A copy of ``det``'s state that a snapshot can hold, or None (logged once per run) when there is none."""
    try:
        state = copy.deepcopy(det.state_dict())  # copied now: the snapshot is written later, on another thread
        if not isinstance(state, Mapping):
            raise TypeError(f"state_dict returned {type(state).__name__}, not a mapping")
        # as saved: a state a restore would refuse (it would refuse the whole snapshot) is not saved
        encode_detector_state(state, f"detector {name} of run {r.name}")
        return dict(state)
    except Exception as exc:
        if name not in r.unsaveable:
            r.unsaveable.add(name)
            log.error("the state of detector %s of run %s cannot be saved (it restarts fresh after a restore): "
                      "%s: %s", name, r.name, type(exc).__name__, exc)
        return None


def run_state_locked(r: Run) -> dict[str, Any]:
    logged = {id(rec) for rec in r.log}
    return {
        "world_size": r.world_size,
        **layouts_state(lay for rank, lay in r.layouts.items() if rank == lay.rank),  # a node's layout once
        "detectors": dict(r.saved_detectors),
        "log": [rec.copy().model_dump(mode="json") for rec in r.log],
        # active findings old enough to have left the bounded log
        "active": [rec.copy().model_dump(mode="json") for rec in r.active.values() if id(rec) not in logged],
        "last_step": r.last_step,
        "last_time": r.last_time,
        "findings_total": [[d, s, n] for (d, s), n in r.findings_total.items()],
        "stop_reason": r.stop_reason,
        "sender_dropped": r.sender_dropped,
        "finished": r.finished,
        "ended": sorted(r.ended),
        "config_changes": [[step, settings] for step, settings in r.config_changes],
        "attempt": r.attempt,
        "attempts": list(r.attempts),
        "attempt_count": r.attempt_count,
        "rejected": dict(r.rejected),
    }


def load_state_dict(table: Table, state: Mapping[str, Any] | SnapshotState) -> None:
    """Take the runs and counters of a saved ``state`` into ``table``; raises ``ValidationError`` (and takes
    nothing) when ``state`` is not a :class:`~gfservice.saved.SnapshotState`."""
    saved = state if isinstance(state, SnapshotState) else SnapshotState.model_validate(state)
    with table.lock:
        for name, s in saved.runs.items():
            run = new_run(table, name, s.world_size, s.attempt)
            run.attempts.clear()
            run.attempts.extend(a for a in s.attempts if a != run.attempt)
            run.attempts.append(run.attempt)  # the current one newest
            run.attempt_count = max(1, s.attempt_count)
            for lay in s.layouts:
                body = s.layout_tables[lay["table"]] if "table" in lay else {}
                try:
                    restored = parse({**{k: v for k, v in lay.items() if k != "table"}, **body}, table.config)
                    if isinstance(restored, Layout):  # validated like a live one: a Rejected, never a crash
                        register(table, restored)
                except Rejected as exc:  # saved before the checks of today: the run goes on without it
                    log.warning("run %s: a saved layout is refused now: %s", name, exc)
            for step, settings in s.config_changes:  # the run's live reconfigurations, in order
                try:
                    apply(table, run, plan(table, run, settings), carry=False)
                except ConfigError as exc:
                    log.warning("run %s: configuration change at step %d no longer applies: %s", name, step, exc)
                run.config_changes.append((step, dict(settings)))
            _load_detectors(run, s.detectors)
            logged = [Record.from_finding(f) for f in s.log]
            run.log.extend(logged)
            for rec in [*logged, *(Record.from_finding(f) for f in s.active)]:
                if rec.active:
                    run.active[rec.raised.identity] = rec
            cleared = [rec for rec in logged if not rec.active and rec.cleared_time is not None]
            run.cleared.extend(sorted(cleared, key=lambda rec: rec.cleared_time or 0.0))
            run.last_step = s.last_step
            run.last_time = s.last_time
            run.findings_total = {(d, sev): n for d, sev, n in s.findings_total}
            run.stop_reason = s.stop_reason
            run.sender_dropped = s.sender_dropped
            run.finished = s.finished
            run.ended = set(s.ended)
            run.rejected = dict(s.rejected)
            for ident in [i for i in run.active if i[0] == DETECTOR_DISABLED]:  # a restart re-enables them
                clear(run, ident, table.clock())
            with run.lock:
                publish(run)
        table.accepted = saved.accepted
        table.rejected = dict(saved.rejected)


def _load_detectors(run: Run, states: Mapping[str, Mapping[Any, Any]]) -> None:
    """Give each detector of ``run`` its saved state; one that cannot take it starts fresh."""
    for n, d in list(run.detectors.items()):
        if n in states:
            try:
                d.load_state_dict(states[n])
            except Exception as exc:  # a plugin that cannot take its saved state starts fresh
                log.error("detector %s of run %s cannot load its saved state (it starts fresh): %s: %s",
                          n, run.name, type(exc).__name__, exc)
                run.detectors[n] = type(d)(d.config)


_LAYOUT_BODY = ("layers", "numel", "sharded", "units", "kinds")


def layouts_state(layouts: Iterable[Layout]) -> dict[str, Any]:
    """The layouts of a run as plain data, each distinct layer table stored once (256 ranks of a 1,000-layer
    model share one: without this a snapshot holds every layer name 256 times, megabytes to encode)."""
    tables: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for lay in layouts:
        d = lay.model_dump(mode="json", exclude=set(_LAYOUT_BODY))
        body = {k: getattr(lay, k) for k in _LAYOUT_BODY}
        for i, known in enumerate(tables):
            if known == body:
                d["table"] = i
                break
        else:
            d["table"] = len(tables)
            tables.append(body)
        out.append(d)
    return {"layouts": out, "layout_tables": [{k: list(v) for k, v in b.items()} for b in tables]}

