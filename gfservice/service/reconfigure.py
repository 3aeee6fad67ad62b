"""Live reconfiguration: change the detectors of a running run from its next step on, validated before
anything changes, each change recorded (the run's configuration version) and saved with the run.

>>> from gfservice.service.aggregator import Aggregator
>>> agg = Aggregator()
>>> _ = agg.submit({"kind": "layout", "run": "r", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [4],
...                 "sharded": [False]})
>>> summary = agg.configure("r", {"exploding": {"enabled": False}})
>>> summary["version"], summary["detectors"]["exploding"]["state"], "exploding" in agg.run_view("r").detector_configs
(1, 'removed', False)
>>> agg.configure("r", {"exploding": {"factor": "big"}})
Traceback (most recent call last):
...
gfservice.errors.ConfigError: detector 'exploding': ...
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from gfservice import registry
from gfservice.api import Detector
from gfservice.errors import ConfigError
from gfservice.service.findings import DETECTOR_DISABLED, clear
from gfservice.service.runs import Run, Table, log
from gfservice.service.view import publish

__all__ = ["Plan", "apply", "config_changes", "configure", "plan"]

#: Per named detector: the current one (or None), the new one, the fields as given (validated, plain values)
#: and the fields that change (field -> [old, new]).
Plan = dict[str, tuple[Detector | None, Detector, dict[str, Any], dict[str, list[Any]]]]


def configure(table: Table, run: str, detector_settings: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Change the detectors of the live ``run`` from its next step on, without restarting anything.

    ``detector_settings`` maps detector names to the fields to set (as the ``[detectors]`` section of a
    configuration file); fields not named keep their current value, detectors not named are untouched,
    ``enabled = false`` removes a detector from the run and ``enabled = true`` adds one. A changed detector
    is built anew and takes the state of the one it replaces where the detector allows it (same class,
    :meth:`~gfservice.api.Detector.load_state_dict`), else it starts fresh and the summary says so.
    A detector disabled for the run (past its error or time budget) that is named comes back, fresh.
    Findings raised afterwards carry the new configuration version.

    Everything is validated before anything changes: ``ConfigError`` names the detector and the field;
    ``KeyError`` for an unknown run. Returns a plain summary: ``run``, ``step`` (the first step judged
    with it), ``version``, ``changed`` and, per named detector, ``fields`` (field -> [old, new]) and
    ``state`` ("carried over", "fresh: why", "added", "removed", "unchanged", "re-enabled" or "not running").
    """
    with table.lock:
        r = table.get(run)
    with r.judging, r.lock:
        planned = plan(table, r, detector_settings)
        summary = apply(table, r, planned, carry=True)
        changed = {name: given for name, (_, _, given, fields) in planned.items() if fields}
        if changed:
            r.config_changes.append((r.last_step + 1, changed))
        publish(r)
        return {"run": run, "step": r.last_step + 1, "version": len(r.config_changes),
                "changed": bool(changed), "detectors": summary}


def config_changes(table: Table, run: str) -> list[tuple[int, dict[str, dict[str, Any]]]]:
    """The detector configuration changes of ``run``: (first step, detector -> fields set), oldest first."""
    r = table.get_locked(run)
    with r.lock:
        return copy.deepcopy(r.config_changes)


def plan(table: Table, r: Run, settings: Mapping[str, Mapping[str, Any]]) -> Plan:
    """Validate ``settings`` against ``r``'s detectors and build the new ones; changes nothing.

    Returns, per named detector: the current one (or None), the new one, the fields as given (validated,
    plain values) and the fields that change (field -> [old, new]).
    """
    if not isinstance(settings, Mapping):
        raise ConfigError(f"detector settings must map detector names to fields, not {type(settings).__name__}")
    classes: dict[str, type[Detector]] = dict(registry.available())
    if table.lineup.custom and any(n not in r.detectors and n not in classes for n in settings):
        classes.update({n: type(d) for n, d in table.lineup.build().items()})  # a detector taken off the run
    planned: Plan = {}
    for name, fields in settings.items():
        if not isinstance(fields, Mapping):
            raise ConfigError(f"detector {name!r}: expected a table of fields, not {fields!r}")
        old = r.detectors.get(name)
        cls = type(old) if old is not None else classes.get(name)
        if cls is None:
            raise ConfigError(f"unknown detector {name!r}; installed: {', '.join(classes)}")
        base = dict(table.lineup.settings.get(name, {}))
        for _, earlier in r.config_changes:  # a detector off the run keeps the fields set for it meanwhile
            base.update(earlier.get(name, {}))
        try:
            current = old.config if old is not None else cls(base).config
            new = cls({**current.model_dump(), **fields})
        except Exception as exc:  # pydantic's ValidationError names the field; a detector may raise others
            errors = getattr(exc, "errors", None)
            problems = ("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors())
                        if callable(errors) else str(exc))
            raise ConfigError(f"detector {name!r}: {problems}") from None
        before, after = current.model_dump(mode="json"), new.config.model_dump(mode="json")
        if old is None:
            before["enabled"] = False  # not on the run, whatever its configuration says
        changes = {f: [before.get(f), after.get(f)] for f in after if before.get(f) != after.get(f)}
        planned[name] = (old, new, {f: after[f] for f in fields}, changes)
    return planned


def apply(table: Table, r: Run, planned: Plan, carry: bool) -> dict[str, Any]:
    """Swap in the planned detectors; with ``carry``, the replaced ones hand over their state."""
    summary: dict[str, Any] = {}
    for name, (old, new, _given, changes) in planned.items():
        enabled = new.config.enabled
        if name in r.health.disabled:  # named again: it comes back, fresh (its old self may still be stuck)
            del r.health.disabled[name]
            r.health.error_log.pop(name, None)
            if (DETECTOR_DISABLED, name) in r.active:
                clear(r, (DETECTOR_DISABLED, name), table.clock())
            if enabled:
                r.detectors[name] = new
            else:
                r.detectors.pop(name, None)
            summary[name] = {"fields": changes, "state": "re-enabled" if enabled else "removed"}
            continue
        if not changes:
            state = "unchanged" if old is not None else "not running"
        elif not enabled:
            state = "removed" if old is not None else "not running"
            r.detectors.pop(name, None)
        elif old is None:
            state = "added"
            r.detectors[name] = new
        else:
            state = "carried over" if carry else "fresh"
            if carry:
                try:
                    if type(new) is not type(old):
                        raise TypeError(f"{type(old).__name__} is now {type(new).__name__}")
                    new.load_state_dict(copy.deepcopy(old.state_dict()))
                except Exception as exc:  # the detector cannot take its old state: start it afresh
                    new = type(new)(new.config)
                    state = f"fresh: its state did not carry over ({type(exc).__name__}: {exc})"
                    log.warning("detector %s of run %s starts fresh after configure: %s", name, r.name, exc)
            r.detectors[name] = new
        summary[name] = {"fields": changes, "state": state}
    return summary

