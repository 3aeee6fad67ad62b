"""A drift test for slow growth of log norms: CUSUM with an allowance on a smoothed level, and persistence.

Each column (the global norm, or one layer) is a series of log norms. Its *level* is the median of the last
``window`` finite values (robust to single-step spikes, which the spike test judges). The test is Page's CUSUM
(Page, 1954) on the level's increments with an allowance ``k`` per step:
``S_t = max(0, S_{t-1} + (L_t - L_{t-1}) - k)``, i.e. the growth of the level since its best starting point,
less ``k`` for every step taken. A column is *ramping* when ``S`` reaches ``log(ratio)`` **and** the growth is
persistent: the level rose in each of the ``parts`` (3) parts of the last ``parts * span`` steps, by at least
``log(half)`` and ``z`` times the noise of a level difference (from the step-to-step scatter). The allowance
keeps slow healthy drifts (a gradient norm that doubles over a few hundred steps) from adding up; the parts keep
a step change (a learning-rate restart, a layer unfrozen) from passing for a ramp: the median level moves in one
step, or two when it lands half-way, never in three parts.

>>> import numpy as np
>>> ramp = RampTest(width=1)
>>> rng = np.random.default_rng(0)
>>> xs = [rng.normal(0.0, 0.2) + (0.05 * (t - 40) if t > 40 else 0.0) for t in range(120)]   # 5%/step from 40
>>> next(t for t, x in enumerate(xs) if ramp.update(np.array([x]))[0])
79
>>> step = RampTest(width=1)                                    # a 3x step change at 40: not a ramp
>>> any(step.update(np.array([rng.normal(0.0, 0.2) + (1.1 if t > 40 else 0.0)]))[0] for t in range(120))
False
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import deque
from typing import Any

import numpy as np


class RampTest:
    """CUSUM of the increments of a median-smoothed log level, with an allowance, plus a two-halves persistence
    check; vectorised over ``width`` columns. NaN inputs (a layer without a gradient this step) are skipped."""

    def __init__(self, width: int, window: int = 10, allowance: float = 0.01, ratio: float = 3.0, span: int = 7,
                 half: float = 1.25, z: float = 1.0, parts: int = 3) -> None:
        self.z, self.parts = z, parts
        self.width, self.window, self.allowance = width, window, allowance
        self.h, self.span, self.g = math.log(ratio), span, math.log(half)
        self._raw: deque[np.ndarray] = deque(maxlen=window)
        self._levels: deque[np.ndarray] = deque(maxlen=parts * span + 1)
        self._diffs: deque[np.ndarray] = deque(maxlen=max(4 * span, window))
        self.cusum = np.zeros(width)
        #: Per column: steps since the CUSUM last stood at 0, and the level at that point (the ramp's start).
        self.age = np.zeros(width, dtype=np.int64)
        self.start = np.full(width, np.nan)
        self.level = np.full(width, np.nan)

    def update(self, x: np.ndarray) -> np.ndarray:
        """Add one step's log norms; return, per column, whether it is ramping now."""
        x = np.asarray(x, dtype=np.float64)
        if self._raw:
            self._diffs.append(x - self._raw[-1])
        self._raw.append(x)
        raw = np.stack(self._raw)
        ok = np.isfinite(raw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: no level yet
            med = np.nanmedian(np.where(ok, raw, np.nan), axis=0)
        level = np.where(ok.sum(axis=0) >= max(1, self.window // 2), med, np.nan)
        prev = self.level
        delta = np.where(np.isfinite(level) & np.isfinite(prev), level - prev, 0.0)
        self.cusum = np.maximum(0.0, self.cusum + delta - self.allowance)
        rest = self.cusum <= 0
        self.age = np.where(rest, 0, self.age + 1)
        self.start = np.where(rest | np.isnan(self.start), level, self.start)
        self.level = np.where(np.isfinite(level), level, prev)
        self._levels.append(self.level.copy())
        if len(self._levels) < self.parts * self.span + 1:
            return np.zeros(self.width, dtype=bool)
        need = np.maximum(self.g, self.z * self.noise())
        ramping = self.cusum >= self.h
        marks = [self._levels[i * self.span] for i in range(self.parts + 1)]
        with np.errstate(invalid="ignore"):
            for a, b in itertools.pairwise(marks):
                ramping &= b - a >= need
        return ramping

    def noise(self) -> np.ndarray:
        """Per column: the standard deviation of the difference of two levels, from the step-to-step scatter of
        the recent raw values (``1.4826 * median |diff| / sqrt(2)``, blind to a trend), times
        ``1.2533 / sqrt(window)`` (the median of ``window`` values) and ``sqrt(2)``."""
        raw = np.stack(self._diffs) if self._diffs else np.full((1, self.width), np.nan)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            sigma = 1.4826 * np.nanmedian(np.abs(raw), axis=0) / math.sqrt(2)
        return np.nan_to_num(sigma * 1.2533 * math.sqrt(2 / self.window), nan=0.0)

    def restart(self) -> None:
        """Forget the accumulated growth (keep the level)."""
        self.cusum[:] = 0.0
        self.age[:] = 0
        self.start = self.level.copy()

    def state_dict(self) -> dict[str, Any]:
        return {"raw": list(self._raw), "levels": list(self._levels), "diffs": list(self._diffs),
                "cusum": self.cusum, "age": self.age, "start": self.start, "level": self.level}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._raw = deque(state.get("raw", []), maxlen=self.window)
        self._levels = deque(state.get("levels", []), maxlen=self.parts * self.span + 1)
        self._diffs = deque(state.get("diffs", []), maxlen=max(4 * self.span, self.window))
        for k in ("cusum", "age", "start", "level"):
            if k in state:
                setattr(self, k, np.asarray(state[k]))


class SlopeTest:
    """A regression test for a ramp: over the last ``steps`` values of each column, the least-squares line
    rises by ``ratio`` (log) or more, its slope stands ``t`` standard errors above 0, and the line fits better
    than the best single step (two flat levels): a step change (a learning-rate restart, a layer unfrozen) is not
    a ramp. Vectorised over ``width`` columns; NaN inputs are left out of the fit (a column needs
    ``steps * 3 / 4`` finite values).

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> slope = SlopeTest(width=1)
    >>> xs = [rng.normal(0.0, 0.3) + (0.049 * (t - 100) if t > 100 else 0.0) for t in range(200)]  # 5%/step from 100
    >>> next(t for t, x in enumerate(xs) if slope.update(np.array([x]))[0])
    131
    >>> step = SlopeTest(width=1)                                   # a 4x step change at 100: not a ramp
    >>> any(step.update(np.array([rng.normal(0.0, 0.2) + (1.4 if t > 100 else 0.0)]))[0] for t in range(200))
    False
    """

    def __init__(self, width: int, steps: int = 40, ratio: float = 3.0, t: float = 5.0, edge: int = 4) -> None:
        self.width, self.steps, self.h, self.t, self.edge = width, steps, math.log(ratio), t, edge
        self._raw: deque[np.ndarray] = deque(maxlen=steps)
        #: Per column, after each update: the rise of the fitted line over the window (log) and its t-statistic.
        self.rise = np.zeros(width)
        self.tstat = np.zeros(width)

    def update(self, x: np.ndarray) -> np.ndarray:
        """Add one step's values; return, per column, whether the window is a ramp."""
        self._raw.append(np.asarray(x, dtype=np.float64))
        no = np.zeros(self.width, dtype=bool)
        if len(self._raw) < self.steps:
            return no
        y = np.stack(self._raw)                                    # (steps, width)
        w = np.isfinite(y)
        m = w.sum(axis=0)
        y0 = np.where(w, y, 0.0)
        t = np.arange(self.steps, dtype=np.float64)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            tm = (w * t).sum(axis=0) / m
            ym = y0.sum(axis=0) / m
            sxx = (w * (t - tm) ** 2).sum(axis=0)
            b = (w * (t - tm) * (y0 - ym)).sum(axis=0) / sxx
            resid = np.where(w, y0 - ym - b * (t - tm), 0.0)
            sse_line = (resid**2).sum(axis=0)
            se = np.sqrt(sse_line / np.maximum(m - 2, 1) / sxx)
            self.tstat = np.where(se > 0, b / se, np.where(b > 0, np.inf, 0.0))
        self.rise = b * (self.steps - 1)
        ok = m >= 3 * self.steps // 4
        return ok & (self.rise >= self.h) & (self.tstat >= self.t) & (sse_line < self._step_sse(y0, w))

    def _step_sse(self, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Per column: the residual sum of squares of the best fit by two flat levels (one split point, at least
        ``edge`` steps from either end)."""
        cw, cy, cyy = np.cumsum(w, axis=0), np.cumsum(y, axis=0), np.cumsum(y * y, axis=0)
        best = np.full(self.width, np.inf)
        for k in range(self.edge, self.steps - self.edge):
            nl, sl, ql = cw[k - 1], cy[k - 1], cyy[k - 1]
            nr, sr, qr = cw[-1] - nl, cy[-1] - sl, cyy[-1] - ql
            with np.errstate(divide="ignore", invalid="ignore"):
                sse = (ql - sl**2 / nl) + (qr - sr**2 / nr)
            best = np.fmin(best, sse)
        return best

    def state_dict(self) -> dict[str, Any]:
        return {"raw": list(self._raw)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._raw = deque(state.get("raw", []), maxlen=self.steps)
