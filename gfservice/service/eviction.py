"""Forgetting runs: runs retired after they finished, and runs evicted past ``max_runs`` or
``max_memory_bytes``, chosen by :func:`gfservice.service.memory.victims` (finished runs first, live runs with
findings last). Every function here expects the table's lock held unless it says otherwise.

>>> from gfservice.service.aggregator import Aggregator, AggregatorConfig
>>> agg = Aggregator(AggregatorConfig(max_runs=2))
>>> for name in ("a", "b", "c"):
...     _ = agg.submit({"kind": "layout", "run": name, "rank": 0, "world_size": 1, "layers": ["w"],
...                     "numel": [4], "sharded": [False]})
>>> [r["run"] for r in agg.runs()], agg.view().evicted
(['b', 'c'], {'max_runs': 1})
"""

from __future__ import annotations

from gfservice.saved import EvictionReason
from gfservice.service.memory import Standing, victims
from gfservice.service.runs import Run, Table, log

__all__ = ["enforce_memory", "evict", "retire", "retire_finished", "standing"]


def retire(table: Table, run: Run, reason: EvictionReason | None = None) -> None:
    """Forget ``run``, keeping its detector time and errors in the service-wide totals; ``reason`` counts
    an eviction (``AggregatorView.evicted``)."""
    for d, v in dict(run.health.seconds).items():  # copied: it may be judging
        table.retired_seconds[d] = table.retired_seconds.get(d, 0.0) + v
    for d, n in dict(run.health.errors).items():  # copied: it may be judging
        table.retired_errors[d] = table.retired_errors.get(d, 0) + n
    del table.runs[run.name]
    run.memory.detach()
    table.runs_forgotten += 1
    if reason is not None:
        table.evicted[reason.value] = table.evicted.get(reason.value, 0) + 1


def standing(r: Run) -> Standing:
    """What eviction weighs of ``r``."""
    return Standing(r.name, r.finished, r.last_seen, active=len(r.active), stopping=r.stop_reason is not None,
                    steps=len(r.history), nbytes=r.memory.total, created=r.memory.created)


def evict(table: Table, reason: EvictionReason, count: int = 0, free_bytes: int = 0) -> None:
    """Evict at least ``count`` runs and enough to free ``free_bytes``."""
    config = table.config
    chosen = victims([standing(r) for r in table.runs.values()], table.monotonic(), config.idle_after_s,
                     count=count, free_bytes=free_bytes)
    if chosen:
        log.warning("forgetting %d runs (%s: %d runs, %d bytes held; limits %d runs, %d bytes): %s%s",
                    len(chosen), reason.value, len(table.runs), table.ledger.total, config.max_runs,
                    config.max_memory_bytes, ", ".join(s.name for s in chosen[:5]),
                    "..." if len(chosen) > 5 else "")
    for s in chosen:
        retire(table, table.runs[s.name], reason)


def enforce_memory(table: Table) -> None:
    """Evict runs while the runs hold more than ``max_memory_bytes`` (a little more, so as not to evict at
    every message near the limit); the only run left is kept. Takes the table's lock itself."""
    limit = table.config.max_memory_bytes
    if not limit or table.ledger.total <= limit:
        return
    with table.lock:
        over = table.ledger.total - limit
        if over > 0:
            evict(table, EvictionReason.memory, free_bytes=over + limit // 32)


def retire_finished(table: Table, now: float) -> None:
    """Forget runs finished ``finished_ttl_s`` ago or more (``now``: ``Table.monotonic``); the time runs from the
    first tick that saw the run finished, and starts over if it sends again."""
    for r in list(table.runs.values()):
        if not r.finished:
            r.memory.finished_at = None
        elif r.memory.finished_at is None:
            r.memory.finished_at = now
        elif now - r.memory.finished_at >= table.config.finished_ttl_s:
            log.info("run %s finished %.0f s ago: forgotten", r.name, now - r.memory.finished_at)
            retire(table, r, EvictionReason.finished_ttl)
