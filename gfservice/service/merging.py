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

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gfservice.api import StepStats
from gfservice.service.runs import Run, Table
from gfservice.stats import Array, merge_shards
from gfservice.wire import Layout, NodeRanks, RankValues, StepReport

__all__ = ["DENSE_RANKS", "TOP_K", "compact", "merge_node", "merge_ready", "merge_step", "rank_columns"]


def merge_ready(table: Table, run: Run, force: bool = False) -> list[StepStats]:
    """Merge the run's steps that are ready (caller holds ``run.lock``); returns them, to be judged."""
    merged: list[StepStats] = []
    now = table.monotonic()
    while run.pending:
        step = min(run.pending)
        covered = run.pending_ranks.get(step, ())
        complete = len(covered) >= run.world_size
        # each rank's reports arrive in order, so a rank already past this step will not send it any more
        overtaken = run.progress.all_reached(step, run.world_size)
        overdue = now - run.pending_since[step] > table.config.merge_timeout_s
        crowded = len(run.pending) > table.config.max_pending_steps
        if not (complete or overtaken or overdue or crowded or force):
            break
        reports = run.pending.pop(step)
        run.pending_since.pop(step, None)
        run.pending_ranks.pop(step, None)
        stats = merge_step(table, run, step, reports)
        if stats is not None:
            run.begin_step(stats, table.clock())
            merged.append(stats)
    return merged


def merge_step(table: Table, run: Run, step: int, reports: dict[int, StepReport]) -> StepStats | None:
    """The ranks' ``reports`` of ``step`` as one step (None for heartbeats only); counts the merged layer stats.

    A node merge agent's report counts as the ranks it covers. The rank-level arrays hold the ranks that
    reported, in rank order (:attr:`StepStats.ranks`): their size follows the reports, not the world size.
    """
    layer_reports = [r for rank, r in sorted(reports.items()) if run.layouts[rank].reports_layers]
    if not layer_reports:  # heartbeats only: nothing to judge
        return None
    grads = merge_shards([r.grad_stats(run.layers, run.units) for r in layer_reports], run.sharded)
    first = layer_reports[0]
    ws = run.world_size
    ranks, rank_norm, rank_nonfinite, step_time, compute_time = rank_columns(reports.values())
    reported = len(ranks)
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
        missing_ranks=() if reported >= ws else tuple(sorted(set(range(ws)).difference(ranks.tolist()))),
        ranks=ranks,
        **run_context(first, run, len(grads)),
    )
    with table.lock:
        table.layer_stats_merged += len(grads) * len(layer_reports)
    return stats


def rank_columns(reports: Iterable[StepReport]) -> tuple[Array, Array, Array, Array, Array]:
    """The ranks the ``reports`` cover, ascending, and each one's local norm, non-finite flag, step time and
    compute time (NaN, False where not said): a node report adds its ranks, what it kept of each.

    >>> from gfservice.wire import NodeRanks, RankValues
    >>> node = NodeRanks(ranks=[4, 5], nonfinite=[5], local_norm=RankValues(ranks=[5], values=[9.0]))
    >>> ranks, norm, bad, _, _ = rank_columns([StepReport(run="r", rank=4, step=0, node=node),
    ...                                        StepReport(run="r", rank=0, step=0, local_norm=1.0)])
    >>> ranks.tolist(), norm.tolist(), bad.tolist()
    ([0, 4, 5], [1.0, nan, 9.0], [False, False, True])
    """
    nan = float("nan")
    direct: list[tuple[float, float, float, float, float]] = []  # rank, norm, non-finite, step time, compute time
    nodes: list[tuple[Array, ...]] = []
    for r in reports:
        if r.node is None:
            direct.append((r.rank, nan if r.local_norm is None else r.local_norm, r.local_nonfinite,
                           nan if r.step_time is None else r.step_time,
                           nan if r.compute_time is None else r.compute_time))
            continue
        node = r.node
        own = np.asarray(node.ranks, np.int64)
        bad = np.zeros(len(own))
        bad[np.searchsorted(own, node.nonfinite)] = 1.0
        nodes.append((own, _spread(own, node.local_norm), bad, _spread(own, node.step_time),
                      _spread(own, node.compute_time)))
    parts = [np.array(direct, dtype=np.float64).reshape(-1, 5).T, *(np.stack(n) for n in nodes)]
    table = np.concatenate(parts, axis=1)
    table = table[:, np.argsort(table[0], kind="stable")]
    return table[0].astype(np.int64), table[1], table[2] > 0, table[3], table[4]


def _spread(own: Array, values: RankValues | None) -> Array:
    """A node report's values of some of its ranks ``own`` as one entry per rank (NaN where not kept)."""
    out = np.full(len(own), np.nan)
    if values is not None and values.ranks:
        out[np.searchsorted(own, values.ranks)] = values.values
    return out


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


#: A node report carries every covered rank's local norm and times up to this many ranks; past it, the
#: ``TOP_K`` furthest from the node's median (and every non-finite flag, which is a list of ranks anyway).
DENSE_RANKS = 64
TOP_K = 8


def compact(ranks: Sequence[int], values: Sequence[float | None], dense: int = DENSE_RANKS,
            top_k: int = TOP_K) -> RankValues | None:
    """Each rank's value where that is cheap (``dense`` ranks or fewer), else the ``top_k`` outliers (furthest
    from the median in ratio); ``None`` where no rank has one.

    >>> compact([0, 1, 2], [1.0, None, 3.0]).values
    [1.0, 3.0]
    >>> compact(range(100), [1.0] * 50 + [50.0] + [1.0] * 49, dense=8, top_k=1).ranks
    [50]
    """
    known = [(r, float(v)) for r, v in zip(ranks, values, strict=True) if v is not None and np.isfinite(v)]
    if not known:
        return None
    if len(known) > dense:
        v = np.array([x for _, x in known])
        with np.errstate(divide="ignore", invalid="ignore"):
            far = np.abs(np.log(v / np.median(v)))
        keep = np.sort(np.argsort(-np.nan_to_num(far, nan=np.inf), kind="stable")[:top_k])
        known = [known[i] for i in keep]
    return RankValues(ranks=[r for r, _ in known], values=[x for _, x in known])


def merge_node(layout: Layout, reports: Mapping[int, StepReport]) -> dict[str, Any]:
    """One node's ``reports`` of one step (rank -> report, under ``layout``, the node's shared layout) as the one
    report a node merge agent forwards: the statistics merged exactly (:func:`~gfservice.stats.merge_shards`, as
    the aggregator merges ranks), each rank named in :class:`~gfservice.wire.NodeRanks`. A plain dict, as senders
    ship messages.

    >>> lay = Layout(run="r", rank=0, world_size=2, layers=["w"], numel=[4], sharded=[True], ranks=[0, 1])
    >>> reps = {r: StepReport(run="r", rank=r, step=3, local_norm=1.0 + r, local_nonfinite=r == 1,
    ...                       stats={"count": [2], "sum_sq": [1.0 + r], "nonfinite": [r]}) for r in (0, 1)}
    >>> out = merge_node(lay, reps)
    >>> out["stats"]["sum_sq"].tolist(), out["node"]["nonfinite"], out["node"]["local_norm"]["values"]
    ([3.0], [1], [1.0, 2.0])
    """
    ordered = [reports[r] for r in sorted(reports)]
    first = ordered[0]
    with_stats = [r for r in ordered if r.stats]
    stats: dict[str, Any] = {}
    if with_stats:
        layers = tuple(layout.layers)
        stats = merge_shards([r.grad_stats(layers) for r in with_stats], layout.sharded).arrays()
    ranks = [r.rank for r in ordered]
    node = NodeRanks(ranks=ranks, nonfinite=[r.rank for r in ordered if r.local_nonfinite],
                     local_norm=compact(ranks, [r.local_norm for r in ordered]),
                     step_time=compact(ranks, [r.step_time for r in ordered]),
                     compute_time=compact(ranks, [r.compute_time for r in ordered]))
    head = with_stats[0] if with_stats else first
    return {**dict(head), "rank": ranks[0], "stats": stats, "time": max(r.time for r in ordered),
            "skipped": any(r.skipped for r in ordered), "local_norm": None, "step_time": None,
            "compute_time": None, "local_nonfinite": bool(node.nonfinite), "node": node.model_dump(),
            "monitor_errors": sum(r.monitor_errors for r in ordered)}
