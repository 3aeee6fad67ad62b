"""A fleet of service actors sharded by run: which shard holds a run, and what each shard is called and keeps.

``[service] shards = N`` (``GFSERVICE_SERVICE__SHARDS=N``, ``gfservice serve --shards N``) runs N aggregator
actors. Shard 0 is the service as it always was (same actor name, state directory, snapshot and discovery file);
shard ``i > 0`` is the actor ``NAME-shard-i`` with its own state directory ``STATE_DIR/shard-i`` (its snapshot
inside), its own ``/metrics`` port and its own discovery file ``prometheus-sd-shard-i.json`` beside shard 0's (the
Prometheus glob ``prometheus-sd*.json`` finds every one).

A run lives on the shard that rendezvous hashing (highest random weight) picks among the shard names: every
client computes it alone from the run name and the shard list (which shard 0 tells), nothing is recorded, and
going from N to N+1 shards moves only the runs the new shard wins (about 1/(N+1) of them).

>>> names = shard_names("gfservice", 4)
>>> names
['gfservice', 'gfservice-shard-1', 'gfservice-shard-2', 'gfservice-shard-3']
>>> shard_for("llama-405b", names) in names, shard_for("llama-405b", names) == shard_for("llama-405b", names)
(True, True)
>>> shard_for("any run", ["gfservice"])
'gfservice'
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gfservice.config import SNAPSHOT_NAME, Settings

__all__ = ["fleet_of", "group_by_shard", "merge_runs", "merge_status", "message_run", "shard_for", "shard_index",
           "shard_names", "shard_settings"]

#: The largest fleet (a bound on the configuration, not on the design).
MAX_SHARDS = 256


def shard_names(name: str, shards: int) -> list[str]:
    """The actor names of a fleet of ``shards`` shards: ``name`` itself for shard 0, ``name-shard-i`` after."""
    if not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be between 1 and {MAX_SHARDS}, got {shards}")
    return [name] + [f"{name}-shard-{i}" for i in range(1, shards)]


def shard_index(name: str, actor_name: str) -> int | None:
    """Which shard of the fleet ``name`` the actor ``actor_name`` is (``None``: not one of its shards).

    >>> [shard_index("gf", a) for a in ("gf", "gf-shard-12", "gf-shard-x", "g")]
    [0, 12, None, None]
    """
    if actor_name == name:
        return 0
    prefix = f"{name}-shard-"
    rest = actor_name[len(prefix):] if actor_name.startswith(prefix) else ""
    return int(rest) if rest.isdigit() and not rest.startswith("0") else None


def fleet_of(actor_name: str, shards: int) -> list[str]:
    """The shard names of the fleet the actor ``actor_name`` belongs to, in a fleet of ``shards``.

    >>> fleet_of("gf", 1), fleet_of("gf-shard-2", 3)
    (['gf'], ['gf', 'gf-shard-1', 'gf-shard-2'])
    """
    base, sep, rest = actor_name.rpartition("-shard-")
    if shards > 1 and sep and rest.isdigit() and 0 < int(rest) < shards:
        return shard_names(base, shards)
    return shard_names(actor_name, shards)


def _weight(shard: str, run: str) -> int:
    digest = hashlib.blake2b(f"{shard}\x00{run}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def shard_for(run: str, shards: Sequence[str]) -> str:
    """The shard of ``run``: the one with the highest hash of (shard, run). Stable across processes and
    versions (BLAKE2b, not Python's salted ``hash``); adding a shard moves only the runs it wins."""
    if len(shards) == 1:
        return shards[0]
    return max(shards, key=lambda s: _weight(s, run))


def message_run(message: Any) -> str:
    """The run a wire message belongs to (a model with ``.run`` or a plain dict with ``"run"``); ``""`` when it
    names none (the shard of ``""`` then refuses it, as one service would)."""
    run = message.get("run") if isinstance(message, Mapping) else getattr(message, "run", None)
    return run if isinstance(run, str) else ""


def group_by_shard(messages: Sequence[Any], shards: Sequence[str]) -> dict[str, list[int]]:
    """The indices of ``messages`` for each shard, in order.

    >>> group_by_shard([{"run": "a"}, {"run": "b"}, {"run": "a"}], ["only"])
    {'only': [0, 1, 2]}
    """
    out: dict[str, list[int]] = {}
    for i, m in enumerate(messages):
        out.setdefault(shard_for(message_run(m), shards), []).append(i)
    return out


def _beside(path: str, i: int) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}-shard-{i}{p.suffix}"))


def shard_settings(settings: Settings, index: int) -> Settings:
    """The settings of shard ``index`` of the fleet ``settings`` describes (shard 0: ``settings`` unchanged).

    >>> s = Settings.model_validate({"service": {"state_dir": "/srv/gf", "shards": 3, "metrics_port": 9464}})
    >>> two = shard_settings(s, 2).service
    >>> two.name, two.state_dir, two.snapshot_path, two.metrics_port
    ('gfservice-shard-2', '/srv/gf/shard-2', '/srv/gf/shard-2/snapshot.json', 9466)
    >>> two.sd_file
    '/srv/gf/prometheus-sd-shard-2.json'
    >>> shard_settings(s, 0) is s
    True
    """
    cfg = settings.service
    if index == 0:
        return settings
    if not 0 < index < cfg.shards:
        raise ValueError(f"shard {index} is not one of the {cfg.shards} shards")
    state_dir = str(Path(cfg.state_dir) / f"shard-{index}")
    default_snapshot = str(Path(cfg.state_dir) / SNAPSHOT_NAME)
    snapshot = (str(Path(state_dir) / SNAPSHOT_NAME) if cfg.snapshot_path == default_snapshot
                else _beside(cfg.snapshot_path, index) if cfg.snapshot_path else "")
    port = cfg.metrics_port + index if cfg.metrics_port else cfg.metrics_port  # None: off; 0: any free port
    service = cfg.model_copy(update={
        "name": shard_names(cfg.name, cfg.shards)[index], "state_dir": state_dir, "snapshot_path": snapshot,
        "sd_file": _beside(cfg.sd_file, index) if cfg.sd_file else "", "metrics_port": port})
    return settings.model_copy(update={"service": service})


# ---- one service out of many answers ----------------------------------------------------------------------
def merge_runs(per_shard: Mapping[str, Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The run rows of every shard (actor name -> rows) as one list, each row naming its ``shard``; a run on
    two shards (after the fleet grew) shows once, as the shard that heard from it last has it.

    >>> merge_runs({"s0": [{"run": "a", "last_time": 1.0}], "s1": [{"run": "a", "last_time": 2.0}, {"run": "b"}]})
    [{'run': 'a', 'last_time': 2.0, 'shard': 's1'}, {'run': 'b', 'shard': 's1'}]
    """
    rows: dict[str, dict[str, Any]] = {}
    for shard, shard_rows in per_shard.items():
        for row in shard_rows:
            old = rows.get(row["run"])
            if old is None or (row.get("last_time") or 0) > (old.get("last_time") or 0):
                rows[row["run"]] = {**row, "shard": shard}
    return list(rows.values())


def _add(a: Any, b: Any) -> Any:
    """Counters added, nested dicts key by key (a key one side lacks counts as 0 there)."""
    if isinstance(a, dict) or isinstance(b, dict):
        a, b = (a if isinstance(a, dict) else {}), (b if isinstance(b, dict) else {})
        return {k: _add(a.get(k), b.get(k)) for k in {**a, **b}}
    if a is None or b is None:
        return b if a is None else a
    return a + b if isinstance(a, int | float) and isinstance(b, int | float) else a


def merge_status(per_shard: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The statuses of the shards (actor name -> status, shard 0 first) as one: counters and restored runs
    added, runs merged (:func:`merge_runs`), snapshot health the worst of any shard, version, pid and auth of
    shard 0, every ``/metrics`` address joined; ``shards`` lists each shard's own pid, address and run count.
    One shard's status is returned as it is.

    >>> one = {"version": "1", "pid": 7, "uptime_s": 5.0, "restored_runs": 1, "metrics": "h:1", "auth": "none",
    ...        "snapshot": {"last_success": 9.0, "failures": 0.0}, "counters": {"accepted": 3, "rejected": {}},
    ...        "runs": [{"run": "a", "last_time": 1.0}]}
    >>> merge_status({"gf": one}) is one
    True
    >>> two = {**one, "pid": 8, "metrics": "h:2", "counters": {"accepted": 4, "rejected": {"oversized": 1}},
    ...        "snapshot": {"last_success": 4.0, "failures": 1.0}, "runs": [{"run": "b", "last_time": 2.0}]}
    >>> m = merge_status({"gf": one, "gf-shard-1": two})
    >>> m["counters"] == {"accepted": 7, "rejected": {"oversized": 1}}, m["metrics"], m["snapshot"]
    (True, 'h:1, h:2', {'last_success': 4.0, 'failures': 1.0})
    >>> [r["run"] for r in m["runs"]], [s["runs"] for s in m["shards"]]
    (['a', 'b'], [1, 1])
    """
    statuses = list(per_shard.values())
    if len(statuses) == 1:
        return statuses[0]
    first = statuses[0]
    counters: dict[str, Any] = {}
    for s in statuses:
        counters = _add(counters, s["counters"])
    successes = [s["snapshot"]["last_success"] for s in statuses]
    metrics = [s["metrics"] for s in statuses if s["metrics"]]
    return {
        **first,
        "uptime_s": min(s["uptime_s"] for s in statuses),
        "restored_runs": sum(s["restored_runs"] for s in statuses),
        "snapshot": {"last_success": None if None in successes else min(successes),
                     "failures": sum(s["snapshot"]["failures"] for s in statuses)},
        "metrics": ", ".join(metrics) or None,
        "counters": counters,
        "runs": merge_runs({name: s["runs"] for name, s in per_shard.items()}),
        "shards": [{"name": name, "pid": s["pid"], "metrics": s["metrics"], "runs": len(s["runs"]),
                    "uptime_s": s["uptime_s"], "restored_runs": s["restored_runs"]} for name, s in per_shard.items()],
    }
