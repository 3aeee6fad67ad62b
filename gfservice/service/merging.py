"""Merging: the reports of a step's ranks, once all are in (or no more are coming), into one
:class:`~gfservice.api.StepStats`, taken into the run's history before it is judged.

A waiting step is merged when every rank reported it, when every missing rank is already past it (each rank
reports in order), when it waited ``merge_timeout_s``, when more than ``max_pending_steps`` wait, or when
forced (the run ended, or a flush). A missing rank is named in ``StepStats.missing_ranks``.

>>> from gfservice.service.aggregator import Aggregator
>>> agg = Aggregator()
>>> for rank in (0, 1):
...     _ = agg.submit({"kind": "layout", "run": "r", "rank": rank, "world_size": 2, "layers": ["w"],
...                     "numel": [4], "sharded": [False]})
>>> _ = agg.submit({"kind": "step", "run": "r", "rank": 0, "step": 0, "stats": {"count": [4], "sum_sq": [1.0],
...                 "max_abs": [0.5], "nonfinite": [0]}})
>>> agg.latest("r") is None, len(agg.flush("r")), agg.latest("r").missing_ranks
(True, 0, (1,))
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gfservice.api import StepStats
from gfservice.service.runs import Run, Table
from gfservice.stats import merge_shards
from gfservice.wire import StepReport

__all__ = ["merge_ready", "merge_step"]


def merge_ready(table: Table, run: Run, force: bool = False) -> list[StepStats]:
    """Merge the run's steps that are ready (caller holds ``run.lock``); returns them, to be judged."""
    merged: list[StepStats] = []
    now = table.monotonic()
    while run.pending:
        step = min(run.pending)
        got = run.pending[step]
        complete = len(got) >= run.world_size
        # each rank's reports arrive in order, so a rank already past this step will not send it any more
        overtaken = all(run.rank_last_step.get(r, -1) > step for r in range(run.world_size) if r not in got)
        overdue = now - run.pending_since[step] > table.config.merge_timeout_s
        crowded = len(run.pending) > table.config.max_pending_steps
        if not (complete or overtaken or overdue or crowded or force):
            break
        reports = run.pending.pop(step)
        run.pending_since.pop(step, None)
        stats = merge_step(table, run, step, reports)
        if stats is not None:
            run.begin_step(stats, table.clock())
            merged.append(stats)
    return merged


def merge_step(table: Table, run: Run, step: int, reports: dict[int, StepReport]) -> StepStats | None:
    """The ranks' ``reports`` of ``step`` as one step (None for heartbeats only); counts the merged layer stats."""
    layer_reports = [r for rank, r in sorted(reports.items()) if run.layouts[rank].reports_layers]
    if not layer_reports:  # heartbeats only: nothing to judge
        return None
    grads = merge_shards([r.grad_stats(run.layers, run.units) for r in layer_reports], run.sharded)
    first = layer_reports[0]
    ws = run.world_size
    rank_norm = np.full(ws, np.nan)
    rank_nonfinite = np.zeros(ws, bool)
    step_time = np.full(ws, np.nan)
    compute_time = np.full(ws, np.nan)
    for rank, r in reports.items():
        if r.local_norm is not None:
            rank_norm[rank] = r.local_norm
        rank_nonfinite[rank] = r.local_nonfinite
        if r.step_time is not None:
            step_time[rank] = r.step_time
        if r.compute_time is not None:
            compute_time[rank] = r.compute_time
    stats = StepStats(
        run=run.name,
        step=step,
        grads=grads,
        time=max(r.time for r in reports.values()) or table.clock(),
        loss=first.loss,
        lr=first.lr,
        loss_scale=first.loss_scale,
        skipped=any(r.skipped for r in reports.values()),
        rank_norm=rank_norm if ws > 1 else None,
        rank_nonfinite=rank_nonfinite if ws > 1 else None,
        step_time=step_time,
        compute_time=compute_time if np.isfinite(compute_time).any() else None,
        missing_ranks=tuple(sorted(set(range(ws)) - set(reports))),
        **run_context(first, run, len(grads)),
    )
    with table.lock:
        table.layer_stats_merged += len(grads) * len(layer_reports)
    return stats


def run_context(first: StepReport, run: Run, n_layers: int) -> dict[str, Any]:
    """What the sender read of the optimizer, the module kinds and the format, as :class:`StepStats` fields
    (each only where it was sent and fits this step's layers)."""
    lay = run.layouts.get(first.rank)
    kinds = lay.kinds if lay is not None and lay.kinds else None
    groups = first.layer_group
    return {
        "group_lr": None if first.group_lr is None else np.asarray(first.group_lr, np.float64),
        "group_wd": None if first.group_wd is None else np.asarray(first.group_wd, np.float64),
        "layer_group": np.asarray(groups, np.int64) if groups is not None and len(groups) == n_layers else None,
        "layer_kinds": tuple(kinds) if kinds is not None and len(kinds) == n_layers else None,
        "precision": first.precision,
        "autocast": first.autocast,
        "guard_skips": None if first.guard_skips is None else dict(first.guard_skips),
    }
