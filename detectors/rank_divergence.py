"""``rank_divergence``: one DDP rank's local gradient norm stays an outlier against the other ranks.

Under DDP every rank computes the gradient of its own batch (its *local*, pre-allreduce gradient norm,
``StepStats.rank_norm``) before the all-reduce averages them. The ranks draw from the same data, so their local
norms are exchangeable: they differ from step to step, a lot with small per-rank batches, but no rank stays
above or below the others. One that does reads a different distribution: a corrupted or mislabelled data
shard, a bad preprocessing path, a faulty device or silent data corruption.

At each step, each rank's deviation is ``d = log(norm) - median over ranks of log(norm)``. Over the last
``window`` steps a rank diverges when the median of its deviations is beyond both

- ``log(min_ratio)``: its local norm is typically ``min_ratio`` times (or 1/``min_ratio`` of) the median rank's, and
- ``z_threshold`` standard errors of such a window median, from the spread of the deviations in the same window
  (1.4826 x the median over ranks of each rank's median absolute deviation from its window median, ignoring the
  exact zeros of the median rank; the standard error of a median of n values is 1.2533 sigma / sqrt(n)), so that
  noisy per-rank norms (small batches) need a larger offset.

The median over the window is robust to single-step spikes (one rank drawing a hard example), so a finding
needs the offset in more than half of the window: with the default window of 20 it comes 10 to 25 steps after
the onset. It names the rank (``Finding.ranks``), one finding per rank (key ``rank<N>``), and clears when the
rank is back among the others. Severity: warning.

Defaults, measured on ``benchmarks/zoo_ranks.py`` (real DDP, gloo, 3-4 ranks on a CPU, 9 healthy runs of 300
steps): healthy window medians reach 1.8x off the median rank with 32 samples per rank and 2.4x with 8 (robust z up
to 4.9), but never both a large ratio and a large z: the closest healthy window came to 0.61 of the bounds below. A
rank whose labels are shuffled sits 3.1-3.3x above the others (z 33-52), one whose inputs are scaled 10x 8-10x (z
19-41). ``z_threshold = 8`` and ``min_ratio = 2`` find both within 8-26 steps.

Needs 3 or more ranks to name the outlier: with 2 ranks the median is their geometric mean, both deviate by the
same amount (``min_ratio`` 2 then means 4x between them) and either could be the odd one. Then the finding (key
``pair``) says the two ranks diverge and names the rank whose own window median moved against its previous window
(by ``min_ratio`` or more, and over twice as much as the other's), when ``2 * window`` steps are known: an educated
guess (a corrupted shard changes one rank's norms, while training moves both); both ranks otherwise.

Only DDP local norms are judged (``ddp_only``): a step counts when it carries DDP compute times
(``StepStats.compute_time``, which only DDP's gradient hook measures). FSDP ranks report the norm of their own
shard of the reduced gradient, and shards legitimately differ (the rows of an embedding that hold frequent tokens
get most of its gradient). Data pipelines that give each rank a different data source on purpose diverge by
design: disable the detector for them.

>>> from gfservice.testing import make_step, replay
>>> rng = np.random.default_rng(0)
>>> norms = np.exp(rng.normal(0.0, 0.3, (80, 4)))          # 4 ranks with noisy, exchangeable local norms
>>> norms[50:, 2] *= 3.0                                    # rank 2's shard goes bad at step 50
>>> steps = [make_step(step=i, sum_sq=[1.0], rank_norm=n, compute_time=[0.1] * 4) for i, n in enumerate(norms)]
>>> f = replay(RankDivergence(), steps)[0]
>>> f.step, f.ranks, f.key, f.severity.value
(66, [2], 'rank2', 'warning')
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats
from gfservice.stats import RankWindow

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this estimates its standard deviation
MEDIAN_SE = 1.2533  # standard error of the median of n normal values: 1.2533 sigma / sqrt(n)


def nanmedian_columns(a: np.ndarray) -> np.ndarray:
    """Median of the finite values of each column of ``a`` (NaN for a column without any), without warnings.

    >>> nanmedian_columns(np.array([[1.0, np.nan, np.nan], [3.0, 2.0, np.nan], [np.nan, 4.0, np.nan]])).tolist()
    [2.0, 3.0, nan]
    """
    s = np.sort(np.where(np.isfinite(a), a, np.nan), axis=0)  # NaN sort last
    n = np.count_nonzero(np.isfinite(s), axis=0)
    lo = np.take_along_axis(s, np.maximum((n - 1) // 2, 0)[None, :], axis=0)[0]
    hi = np.take_along_axis(s, np.maximum(n // 2, 0)[None, :], axis=0)[0]
    return np.where(n > 0, (lo + hi) / 2, np.nan)


class RankDivergence(Detector):
    """A DDP rank whose local (pre-allreduce) gradient norm stays an outlier against the other ranks."""

    name = "rank_divergence"

    class Config(DetectorConfig):
        #: Steps whose median deviation is judged (the offset must hold in more than half of them).
        window: int = Field(20, ge=3)
        #: The window median must be this many standard errors of such a median away from the other ranks.
        z_threshold: float = Field(8.0, gt=0)
        #: ... and at least this ratio (or its inverse) to the median rank's local norm.
        min_ratio: float = Field(2.0, gt=1.0)
        #: Judge only steps that carry DDP compute times (local norms before an all-reduce, not FSDP shards).
        ddp_only: bool = True

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._dev = RankWindow(self.config.window)
        self._logs = RankWindow(2 * self.config.window)

    def update(self, step: StepStats) -> list[Finding] | None:
        norms = step.rank_norm
        if norms is None or (self.config.ddp_only and step.compute_time is None):
            return None
        norms = np.asarray(norms, dtype=np.float64)
        ranks = step.ranks_of(norms)
        if step.ranks is None and len(self._dev.ids) not in (0, len(norms)):  # dense: another world size
            self._dev.clear()
            self._logs.clear()
        with np.errstate(divide="ignore", invalid="ignore"):
            logs = np.where(np.isfinite(norms) & (norms > 0), np.log(norms), np.nan)
        if np.count_nonzero(np.isfinite(logs)) < 2:
            return None
        self._dev.append(ranks, logs - nanmedian_columns(logs[:, None])[0])
        self._logs.append(ranks, logs)
        cfg = self.config
        if len(self._dev) < cfg.window:
            return []
        dev = self._dev.stack()
        ids = self._dev.ids
        enough = np.count_nonzero(np.isfinite(dev), axis=0) >= math.ceil(0.75 * cfg.window)
        if np.count_nonzero(enough) < 2:
            return []
        center = np.where(enough, nanmedian_columns(dev), np.nan)
        # The spread of the deviations: each rank's median |d - its window median| (the median rank's exact zeros
        # say nothing), and the median over ranks of those keeps a noisy diverging rank out of it.
        spread = nanmedian_columns(np.where(dev == 0.0, np.nan, np.abs(dev - center))[:, enough])
        spread = spread[np.isfinite(spread)]
        sigma = MAD_TO_SIGMA * float(np.median(spread)) if spread.size else 0.0
        se = MEDIAN_SE * sigma / math.sqrt(cfg.window)
        bound = max(math.log(cfg.min_ratio), cfg.z_threshold * se)
        out_ranks = np.flatnonzero(np.nan_to_num(np.abs(center), nan=0.0) > bound)
        if not out_ranks.size:
            return []
        n_ranks = int(np.count_nonzero(enough))
        z = np.abs(center) / se if se > 0 else np.full_like(center, np.inf)
        if len(ids) == 2:
            return [self._pair(step, center, bound, z)]
        out = []
        for r in out_ranks:
            ratio = math.exp(float(center[r]))
            side = f"{ratio:.2g}x" if ratio >= 1 else f"1/{1 / ratio:.2g}"
            out.append(self.finding(
                step, "warning",
                f"rank {ids[r]}'s local (pre-allreduce) gradient norm has been {side} that of the median of the "
                f"{n_ranks} ranks over the last {cfg.window} steps (robust z {float(z[r]):.0f}) at step {step.step}; "
                "its data shard or device may be bad (corrupted or mislabelled data, a faulty GPU, silent data "
                "corruption): compare that rank's inputs and loss with the others' and check its device",
                ranks=[int(ids[r])], value=ratio, threshold=math.exp(bound), key=f"rank{ids[r]}",
            ))
        return out

    def _pair(self, step: StepStats, center: np.ndarray, bound: float, z: np.ndarray) -> Finding:
        """Two ranks diverge: name the one whose own norms moved more, when the history tells."""
        ratio = math.exp(2 * abs(float(center[0])))
        suspect: list[int] = []
        w = self.config.window
        pair = [int(r) for r in self._dev.ids]
        if len(self._logs) == 2 * w and np.array_equal(self._logs.ids, self._dev.ids):
            logs = self._logs.stack()
            moved = np.abs(nanmedian_columns(logs[w:]) - nanmedian_columns(logs[:w]))
            r = int(np.argmax(np.nan_to_num(moved, nan=0.0)))
            if np.isfinite(moved).all() and moved[r] > math.log(self.config.min_ratio) and moved[1 - r] < moved[r] / 2:
                suspect = [pair[r]]
        who = (f"rank {suspect[0]}'s norms moved more against their own history, so it is the likelier culprit"
               if suspect else "with 2 ranks either could be the odd one")
        return self.finding(
            step, "warning",
            f"the local (pre-allreduce) gradient norms of ranks {pair[0]} and {pair[1]} have differed {ratio:.2g}x "
            f"over the last {w} steps (robust z {float(z[0]):.0f}) at step {step.step}; {who}: compare the two "
            "ranks' data and loss and check their devices",
            ranks=suspect or pair, value=ratio, threshold=math.exp(2 * bound), key="pair",
        )

    def state_dict(self) -> dict[str, Any]:
        dev, logs = self._dev.state_dict(), self._logs.state_dict()
        return {"dev": dev["rows"], "dev_ids": dev["ids"], "logs": logs["rows"], "logs_ids": logs["ids"]}

    def load_state_dict(self, state) -> None:
        self._dev.load_state_dict(state, rows_key="dev", ids_key="dev_ids")
        self._logs.load_state_dict(state, rows_key="logs", ids_key="logs_ids")
