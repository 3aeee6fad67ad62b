"""``straggler``: one rank stays well slower than the others, and the whole job runs at its pace.

Under DDP the step time says nothing about who is slow: the fast ranks wait for the slow one in the
all-reduce, so every rank's step takes as long (a rank sleeping 0.15 s per step leaves the ratio of the ranks'
step times at 1.0). What differs is each rank's own work before it joins the all-reduce: ``StepStats.compute_time``,
the seconds from the end of its previous ``monitor.step()`` until its first DDP gradient bucket was ready (data
loading, forward, backward). The detector uses it where the step carries it, and the ranks' step times
(``StepStats.step_time``) otherwise (no DDP: ranks that do not wait for each other). The window restarts when
the source changes.

Scores follow NVIDIA resiliency-ext's straggler detection ("relative performance score": the best rank is the
reference, 1.0 is as fast as the best, 0.5 twice as slow; their examples flag ranks under 0.7): over the last
``window`` steps each rank's score is the best rank's median time divided by its own median time. A rank is a
straggler when its score is below ``threshold`` and its median is also ``min_excess_s`` above the best rank's: a
tiny job whose ranks take 2 ms and 4 ms to compute does not need a ticket. Medians make one slow step (a
checkpoint, a garbage collection) count for nothing: a rank must be slow in more than half of the window. One
finding per rank (key ``rank<N>``, naming it); it clears when the rank catches up. Severity: warning.

Defaults: ``threshold = 0.7`` is resiliency-ext's example threshold. ``window`` and ``min_excess_s`` were measured
on ``benchmarks/zoo_ranks.py`` (3-4 DDP ranks on a shared 2-core machine, the worst case a healthy job sees: a step
computes in 2-10 ms there, and a rank that the scheduler serves less for a while looks slow). With a window of 30 and
a floor of 0.02 s one healthy run in 20 raised a finding at a load of 15 (the others' ranks' medians differed by up
to 19 ms, scores down to 0.1); with a window of 40, 45 healthy runs of 300 steps, three benchmarks at once (loads up
to 30), differed by 18 ms at most: hence the floor of 0.05 s. A rank sleeping 0.1-0.15 s per step is found 19 steps
after it starts. On dedicated hardware with fast steps a lower floor finds smaller slowdowns.

Caveats: collectives inside the forward make the ranks wait for each other before their first bucket, and then
the compute times equalise too (DDP's ``broadcast_buffers`` for models with buffers such as BatchNorm, tensor or
pipeline parallel groups): a straggler whose delay comes before such a collective goes unseen. The compute time is
taken on the host (when the autograd engine hands DDP the first bucket): on a GPU it sees slow data loading and host
stalls at once, a slow device only as far as the host waits for it (synchronising calls such as ``loss.item()``).

>>> from gfservice.testing import make_step, replay
>>> rng = np.random.default_rng(0)
>>> times = rng.uniform(0.20, 0.25, (80, 4))        # seconds of data, forward and backward per rank
>>> times[40:, 1] += 0.15                            # rank 1 slows down at step 40
>>> steps = [make_step(step=i, sum_sq=[1.0], compute_time=t, step_time=[0.4] * 4) for i, t in enumerate(times)]
>>> f = replay(Straggler(), steps)[0]
>>> f.step, f.ranks, f.key, round(f.value, 2)
(60, [1], 'rank1', 0.63)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats
from gfservice.stats import RankWindow


class Straggler(Detector):
    """A rank that stays well slower than the others (its own data, forward and backward), naming it."""

    name = "straggler"

    class Config(DetectorConfig):
        #: Steps over which each rank's median time is taken.
        window: int = Field(40, ge=3)
        #: A rank whose score (best rank's median time / its own) is below this is slow (resiliency-ext: 0.7).
        threshold: float = Field(0.7, gt=0.0, lt=1.0)
        #: ... and whose median time is at least this many seconds above the best rank's.
        min_excess_s: float = Field(0.05, ge=0.0)

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._times = RankWindow(self.config.window)
        self._source = ""

    def update(self, step: StepStats) -> list[Finding] | None:
        source, times = "compute", step.compute_time
        if times is None:
            source, times = "step", step.step_time
        if times is None or len(times) < 2:
            return None
        times = np.asarray(times, dtype=np.float64)
        if source != self._source or (step.ranks is None and len(self._times.ids) not in (0, len(times))):
            self._times.clear()
            self._source = source
        self._times.append(step.ranks_of(times), np.where(np.isfinite(times) & (times >= 0), times, np.nan))
        cfg = self.config
        if len(self._times) < cfg.window:
            return []
        t = self._times.stack()
        ids = self._times.ids
        enough = np.count_nonzero(np.isfinite(t), axis=0) >= math.ceil(0.75 * cfg.window)
        if np.count_nonzero(enough) < 2:
            return []
        med = np.full(t.shape[1], np.nan)
        s = np.sort(t[:, enough], axis=0)  # NaN sort last
        n = np.count_nonzero(np.isfinite(s), axis=0)
        lo = np.take_along_axis(s, ((n - 1) // 2)[None, :], axis=0)[0]
        hi = np.take_along_axis(s, (n // 2)[None, :], axis=0)[0]
        med[enough] = (lo + hi) / 2
        best_rank = int(np.nanargmin(med))
        best_id = int(ids[best_rank])
        best = float(med[best_rank])
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(med > 0, best / med, 1.0)
        slow = np.flatnonzero(enough & (score < cfg.threshold) & (med - best >= cfg.min_excess_s))
        what = ("its own data loading, forward and backward (before the all-reduce, where the others wait for it)"
                if source == "compute" else "its steps")
        n_ranks = int(np.count_nonzero(enough))
        return [
            self.finding(
                step, "warning",
                f"rank {ids[r]} has been slower than the other {n_ranks - 1} ranks for the last {cfg.window} steps at "
                f"step {step.step}: {what} take {med[r]:.3g} s per step (median) against {best:.3g} s on rank "
                f"{best_id} (score {score[r]:.2f} < {cfg.threshold}), and the whole job runs at its pace; check "
                "that rank's host (other processes, CPU or GPU throttling, its data loading and storage)",
                ranks=[int(ids[r])], value=float(score[r]), threshold=cfg.threshold, key=f"rank{ids[r]}",
            )
            for r in slow
        ]

    def state_dict(self) -> dict[str, Any]:
        saved = self._times.state_dict()
        return {"times": saved["rows"], "ids": saved["ids"], "source": self._source}

    def load_state_dict(self, state) -> None:
        self._times.load_state_dict(state, rows_key="times")
        self._source = str(state.get("source", ""))
