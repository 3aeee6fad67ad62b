"""Admission: which messages a run takes. Runs and their attempts come in with layouts; reports and ends
are checked against what the run knows (the stateless checks are :func:`~gfservice.wire.parse`'s).

Checks that need the run: a step at most ``max_step_jump`` ahead of the run's newest step (``step_jump``; an
attempt's first step may be anything), a ``RunEnd`` or report only from a rank that sent a layout
(``unknown_rank``), a layout that agrees with the other ranks' on layers, sharded flags, sizes, units and (for
senders with attempt ids) world size (``layout_mismatch``), a message of an earlier attempt
(``stale_attempt``). Refusals are counted service-wide and on the run they name (``RunView.rejected``).

A layout with a new attempt id starts a new attempt of its run (a restarted job): step tracking starts over;
findings, history and (for the same layers) detector state are kept.

>>> from gfservice.service.aggregator import Aggregator
>>> agg = Aggregator()
>>> lay = {"kind": "layout", "run": "r", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [4],
...        "sharded": [False], "attempt": "a1"}
>>> _ = agg.submit(lay)
>>> _ = agg.submit({**lay, "attempt": "a2"})
>>> agg.submit({**lay, "attempt": "a1"}).reason
<RejectReason.stale_attempt: 'stale_attempt'>
>>> agg.run_view("r").attempts
2
"""

from __future__ import annotations

import contextlib
from collections import deque
from typing import Any

import numpy as np

from gfservice.api import StepStats
from gfservice.saved import EvictionReason
from gfservice.service.eviction import evict, retire
from gfservice.service.findings import clear_all
from gfservice.service.memory import Layouts, PendingSteps, RecordLog, RunMemory, StepHistory
from gfservice.service.merging import merge_ready
from gfservice.service.runs import Run, Table, log
from gfservice.service.view import publish
from gfservice.wire import Layout, Rejected, RejectReason, RunEnd, StepReport

__all__ = ["check_attempt", "check_consistent", "check_current", "count_rejected", "end", "find", "ingest",
           "new_attempt", "new_run", "register", "take_layout"]


def count_rejected(table: Table, reason: RejectReason, message: Any, t0: float) -> None:
    """Count a refused message service-wide, and on its run when it names one the aggregator has."""
    try:  # a hostile object may lack the field, or raise when asked for it
        name = (message.run if isinstance(message, Layout | StepReport | RunEnd)
                else dict.get(message, "run") if isinstance(message, dict) else None)  # nothing else is trusted
    except Exception:
        name = None
    with table.lock:
        table.rejected[reason.value] = table.rejected.get(reason.value, 0) + 1
        table.count_ingest(t0)
        run = table.runs.get(name) if type(name) is str else None
    if run is not None:
        with run.lock:
            run.rejected[reason.value] = run.rejected.get(reason.value, 0) + 1
            if run.published is not None:
                publish(run)


def find(table: Table, name: str) -> Run:
    with table.lock:
        run = table.runs.get(name)
    if run is None:
        raise Rejected(RejectReason.unknown_run, f"no layout for run {name!r}; send the Layout first")
    return run


def check_current(table: Table, run: Run) -> None:
    """Raise ``unknown_run`` when ``run`` left the run table while the caller waited for its locks."""
    if table.runs.get(run.name) is not run:
        raise Rejected(RejectReason.unknown_run, f"run {run.name!r} was forgotten meanwhile")


def take_layout(table: Table, lay: Layout) -> None:
    """Register ``lay`` holding the current run's locks (if any), then the global lock: a replaced or new
    run is built and published before anyone else can see it."""
    while True:
        with table.lock:
            run = table.runs.get(lay.run)
        with contextlib.ExitStack() as held:
            if run is not None:
                held.enter_context(run.judging)
                held.enter_context(run.lock)
            with table.lock:
                if table.runs.get(lay.run) is not run:
                    continue  # replaced meanwhile: start over with the current one
                target = register(table, lay)
                if target is not run:
                    with target.lock:
                        publish(target)
            if run is not None and target is run:
                publish(run)
            return


def register(table: Table, lay: Layout) -> Run:
    if len(lay.layers) > table.config.max_layers:
        raise Rejected(RejectReason.oversized, f"{len(lay.layers)} layers, limit {table.config.max_layers}")
    run = table.runs.get(lay.run)
    if run is not None and lay.attempt != run.attempt:
        check_attempt(run, lay)  # an older attempt raises stale_attempt
        new_attempt(table, run, lay)
    elif run is None or run.world_size != lay.world_size:
        if run is not None:
            own = set(lay.ranks or (lay.rank,))
            if lay.attempt and any(r not in own for r in run.layouts):
                # senders that tell attempts apart start a new attempt to change the world size
                raise Rejected(RejectReason.layout_mismatch,
                               f"rank {lay.rank} of {lay.run} reports world size {lay.world_size}, "
                               f"the run's other ranks {run.world_size}")
            log.info("run %s restarted with world size %d", lay.run, lay.world_size)
        run = new_run(table, lay.run, lay.world_size, lay.attempt)
    if lay.reports_layers:
        if run.layers and tuple(lay.layers) != run.layers:
            raise Rejected(RejectReason.layout_mismatch, f"rank {lay.rank} of {lay.run} reports other layers")
        check_consistent(run, lay)
        if run.prior_layers is not None:
            if tuple(lay.layers) != run.prior_layers:  # another model: its detectors start afresh
                log.info("run %s attempt %s reports other layers: fresh detectors", run.name, run.attempt)
                run.detectors = {n: type(d)(d.config) for n, d in run.detectors.items()}
            run.prior_layers = None
        run.layers = tuple(lay.layers)
        run.sharded = np.asarray(lay.sharded, dtype=bool)
        run.units = np.asarray(lay.units, dtype=np.int64) if lay.units else None
    for rank in lay.ranks or (lay.rank,):  # a node merge agent's layout stands for each of its node's ranks
        run.layouts[rank] = lay
        run.ended.discard(rank)
    run.finished = False
    run.last_seen = table.monotonic()
    return run


def check_attempt(run: Run, msg: Layout | StepReport | RunEnd) -> None:
    """Raise ``stale_attempt`` for a message of an earlier attempt of ``run`` (caller checked it differs)."""
    if msg.attempt in run.attempts:
        raise Rejected(RejectReason.stale_attempt,
                       f"attempt {msg.attempt!r} of {msg.run} was followed by attempt {run.attempt!r}")


def new_attempt(table: Table, run: Run, lay: Layout) -> None:
    """Start attempt ``lay.attempt`` of ``run`` (a restarted job): step tracking starts over; findings,
    history and (for the same layers) detector state are kept. The previous attempt's waiting steps are
    dropped (merging them without the ranks that died would raise stalled-rank findings about processes that
    are gone), and its active findings clear: the new attempt's detectors raise again what still holds.
    """
    log.info("run %s: attempt %r follows attempt %r (restart)", run.name, lay.attempt, run.attempt)
    if run.pending:
        log.info("run %s: dropping %d unmerged steps of attempt %r", run.name, len(run.pending), run.attempt)
    run.attempt = lay.attempt
    run.attempts.append(lay.attempt)
    run.attempt_count += 1
    run.world_size = lay.world_size
    run.layouts.clear()
    run.pending.clear()
    run.pending_since.clear()
    run.pending_ranks.clear()
    run.progress.clear()
    run.ended.clear()
    run.last_step = -1
    run.finished = False
    run.prior_layers = run.layers if run.prior_layers is None else run.prior_layers
    run.layers = ()
    run.sharded = np.zeros(0, bool)
    run.units = None
    clear_all(run, table.clock())


def new_run(table: Table, name: str, world_size: int, attempt: str = "") -> Run:
    """A fresh run ``name`` (caller holds ``table.lock``), replacing the one of that name. Past ``max_runs``,
    runs are evicted first, in the order of :func:`~gfservice.service.memory.eviction_order`."""
    old = table.runs.get(name)
    if old is not None:
        retire(table, old)
    excess = len(table.runs) + 1 - table.config.max_runs
    if excess > 0:  # a batch at a time (1/64 of the table): each choice weighs every run
        evict(table, EvictionReason.max_runs, count=max(excess, table.config.max_runs // 64))
    detectors = table.lineup.build()
    memory = RunMemory(table.ledger, len(detectors), created=table.monotonic())
    cap = table.config.findings_history
    run = Run(name=name, world_size=world_size, detectors=detectors,
              history=StepHistory(memory, table.config.history), log=RecordLog(memory, cap),
              cleared=deque(maxlen=cap), layouts=Layouts(memory), pending=PendingSteps(memory),
              attempt=attempt, memory=memory, last_seen=memory.created)
    run.attempts.append(attempt)
    table.runs[name] = run
    return run


def end(table: Table, run: Run, msg: RunEnd) -> list[StepStats]:
    if msg.attempt != run.attempt:
        check_attempt(run, msg)
        raise Rejected(RejectReason.unknown_rank, f"rank {msg.rank} of {msg.run} sent no layout for attempt "
                                                  f"{msg.attempt!r}")
    if msg.rank not in run.layouts:
        raise Rejected(RejectReason.unknown_rank, f"rank {msg.rank} of {msg.run} sent no layout")
    run.ended.add(msg.rank)
    run.last_seen = table.monotonic()
    if len(run.ended) >= run.world_size:
        run.finished = True
        return merge_ready(table, run, force=True)
    return []


def ingest(table: Table, run: Run, rep: StepReport) -> list[StepStats]:
    if rep.attempt != run.attempt:  # a late report of an old attempt, or of one whose layout the service lost
        check_attempt(run, rep)
        raise Rejected(RejectReason.unknown_rank, f"rank {rep.rank} of {rep.run} sent no layout for attempt "
                                                  f"{rep.attempt!r}")
    lay = run.layouts.get(rep.rank)
    if lay is None:
        raise Rejected(RejectReason.unknown_rank, f"rank {rep.rank} of {rep.run} sent no layout")
    covers = rep.covers
    if rep.node is not None:  # a node merge agent's report: each rank it covers came in with its layout
        stray = next((r for r in covers if run.layouts.get(r) is not lay), None)
        if stray is not None:
            raise Rejected(RejectReason.unknown_rank, f"rank {stray} of {rep.run} is not in the layout of the node "
                                                      f"of rank {rep.rank}")
    expected = len(lay.layers) if lay.reports_layers else 0
    if rep.n_layers != expected:
        raise Rejected(RejectReason.shape_mismatch, f"{rep.n_layers} layers, layout has {expected}")
    if rep.step <= run.last_step:
        raise Rejected(RejectReason.stale_step, f"step {rep.step} of {rep.run} is already merged")
    newest = max(run.last_step, run.progress.newest)
    if newest >= 0 and rep.step - newest > table.config.max_step_jump:
        raise Rejected(RejectReason.step_jump, f"step {rep.step} of {rep.run} is more than "
                                               f"{table.config.max_step_jump} ahead of its step {newest}")
    covered = run.pending_ranks.get(rep.step)
    if covered is not None:
        again = next((r for r in covers if r in covered), None)
        if again is not None:
            raise Rejected(RejectReason.duplicate, f"rank {again} already reported step {rep.step}")
    else:
        covered = run.pending_ranks[rep.step] = set()
    run.pending.setdefault(rep.step, {})[rep.rank] = rep
    covered.update(covers)
    for rank in covers:
        run.progress.note(rank, rep.step)
    run.last_seen = now = table.monotonic()
    run.pending_since.setdefault(rep.step, now)
    if rep.monitor_errors:
        run.monitor_errors[rep.rank] = max(run.monitor_errors.get(rep.rank, 0), rep.monitor_errors)
    if run.finished or (run.ended and not run.ended.isdisjoint(covers)):  # a run that reports is live again
        log.info("run %s: rank %d reports again after the run was taken as over", run.name, rep.rank)
        run.ended.difference_update(covers)
        run.finished = False
    return merge_ready(table, run)


def check_consistent(run: Run, lay: Layout) -> None:
    """Raise ``layout_mismatch`` when ``lay`` disagrees with another rank's layout of ``run`` on what all ranks
    share: the sharded flags, the full sizes (``numel``) and the output units of every layer."""
    ref = next((o for r, o in run.layouts.items() if r != lay.rank and o.reports_layers), None)
    if ref is None:
        return
    for what, mine, theirs in (("sharded flags", lay.sharded, ref.sharded), ("sizes (numel)", lay.numel, ref.numel),
                               ("units", lay.units, ref.units)):
        if mine != theirs and (what != "units" or (mine and theirs)):
            i = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b), min(len(mine),
                                                                                                    len(theirs)))
            layer = lay.layers[i] if i < len(lay.layers) else "?"
            raise Rejected(RejectReason.layout_mismatch,
                           f"rank {lay.rank} of {lay.run} reports other {what} than rank {ref.rank} "
                           f"(first at layer {layer})")
