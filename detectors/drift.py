"""Drift tests for slow growth of log norms: CUSUM with an allowance on a smoothed level, and persistence
(``RampTest``); a rise against an anchored baseline that every layer shares (``UniformRise``).

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
from dataclasses import dataclass
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


class UniformRise:
    """A rise of the global log norm that every layer shares: the mark of a common factor on every gradient.

    The *level* is the median of the last ``window`` log norms (global, and per layer). The rise is judged against
    an anchored baseline, the lowest global level of the last ``horizon`` steps (at least ``window`` steps back;
    there the level is the median of ``base_window`` steps, so that the lowest of many noisy levels is not biased
    low), not against a reference that follows the ramp. Once the level stands ``ratio`` times above it, the rise is
    *uniform* when the layers rose alike: ``spread = sqrt(sum_i share_i (dl_i - dg)^2 / sum_i share_i)``, with
    ``dg`` the global rise, ``dl_i`` layer i's, ``share_i`` its share of the squared global norm at the anchor
    (layers under 1% left out), stays below ``uniform`` times ``dg``. A loss weight that keeps growing, gradients
    summed without ``zero_grad`` or scaled by a bug multiply every layer alike (spread/dg 0.00-0.04 in the
    evaluation zoo); learning changes layers unequally (a tanh RNN leaving its plateau, an SGD LSTM: 0.10-0.40).
    Vectorised over the layers; NaN inputs (a layer without gradient) are skipped.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> def run(layer_rates):
    ...     test = UniformRise()
    ...     for t in range(150):
    ...         grow = np.log(layer_rates) * max(0, t - 80)
    ...         x = rng.normal(0.0, 0.2, 3) + grow
    ...         rise = test.update(float(np.log(np.exp(2 * x).sum()) / 2), x)
    ...         if rise is not None:
    ...             return t, round(rise.factor, 1)
    >>> run([1.05, 1.05, 1.05])       # every layer 5%/step from step 80: a common factor
    (106, 3.0)
    >>> run([1.08, 1.0, 1.02]) is None  # one layer rises, the others barely: the model learning
    True
    """

    def __init__(self, window: int = 10, horizon: int = 50, ratio: float = 3.0, uniform: float = 0.08,
                 base_window: int = 20) -> None:
        self.window, self.horizon, self.h, self.uniform = window, horizon, math.log(ratio), uniform
        self.base_window = max(base_window, window)
        self._raw: deque[tuple[float, np.ndarray]] = deque(maxlen=self.base_window)
        #: (step index, global level, per-layer levels) of the last ``horizon`` steps.
        self._levels: deque[tuple[int, float, np.ndarray]] = deque(maxlen=horizon + 1)
        self._t = 0

    def update(self, x: float, layers: np.ndarray) -> Rise | None:
        """Add one step's global log norm and per-layer log norms; return the rise when it is uniform. A change
        of the set of layers (parameters frozen or unfrozen) starts the test afresh."""
        layers = np.asarray(layers, dtype=np.float64)
        if self._raw and self._raw[-1][1].shape != layers.shape:
            self._raw.clear()
            self._levels.clear()
        self._raw.append((x, layers))
        self._t += 1
        if len(self._raw) < self.window:
            return None
        level, lay = self._level(self.window)
        if len(self._raw) >= self.base_window:  # a baseline candidate: the median of a longer window
            self._levels.append((self._t, *self._level(self.base_window)))
        past = [e for e in self._levels if e[0] <= self._t - self.window]
        if not past:
            return None
        t0, base, base_lay = min(past, key=lambda e: e[1])
        dg = level - base
        if dg < self.h:
            return None
        share = np.exp(2 * (base_lay - base))
        dl = lay - base_lay
        keep = np.isfinite(share) & np.isfinite(dl) & (share > 0.01)
        if not keep.any():
            return None
        spread = math.sqrt(float(np.sum(share[keep] * (dl[keep] - dg) ** 2) / share[keep].sum()))
        if spread > self.uniform * dg:
            return None
        return Rise(factor=math.exp(dg), steps=self._t - t0, spread=spread / dg, level=math.exp(level))

    def _level(self, n: int) -> tuple[float, np.ndarray]:
        """The median of the last ``n`` global log norms, and of each layer's."""
        raw = list(self._raw)[-n:]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a layer without gradient all window: NaN
            return float(np.median([r[0] for r in raw])), np.nanmedian(np.stack([r[1] for r in raw]), axis=0)

    def reset(self) -> None:
        """Forget the levels (keep the raw window): the next rise is judged from here on."""
        self._levels.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"raw": list(self._raw), "levels": list(self._levels), "t": self._t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._raw = deque(state.get("raw", []), maxlen=self.base_window)
        self._levels = deque(state.get("levels", []), maxlen=self.horizon + 1)
        self._t = int(state.get("t", 0))


@dataclass(frozen=True)
class Rise:
    """A uniform rise: its ``factor`` over ``steps`` steps, its spread across layers (a fraction of the rise),
    and the level it reached."""

    factor: float
    steps: int
    spread: float
    level: float


class SteadyLayerRise:
    """One layer whose gradient compounds against the rest of the model: a steady, sustained rise of both its
    own log norm and its share of the norm (its log norm minus the rest's), as a per-parameter multiplier or a
    gradient term that keeps growing makes, not the model learning.

    Per layer (vectorised over ``width`` columns), two series: ``own`` (log norm) and ``rel`` (log norm minus the
    log norm of the rest). Each must stand ``ratio`` times above its anchored baseline (level: median of the last
    ``window`` values; baseline: the lowest median-of-``base_window`` level of the last ``horizon`` steps, as in
    ``UniformRise``), and each must have risen *steadily* over the last ``span`` steps: the t-statistic of an
    ordinary least-squares slope at least ``t_own`` for ``own`` and ``t_rel`` for ``rel``. A compounding factor
    is a straight line on the log scale, and the share cancels the batch-to-batch noise that every layer shares,
    so ``rel``'s slope is sharp (t 36-45 at the 3x crossing in the evaluation zoo's ``layer_ramp``, own 6.1-7.7);
    layers that rise alone while a healthy model organises wander and revert (a transformer's final LayerNorm:
    rel t 26 but own 3.5; BatchNorm weights under weight decay: own 10.7 but rel 6-8). A step without gradient
    (NaN) in the span leaves that layer unjudged; a change of the set of layers starts afresh.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> def first(rate):
    ...     test = SteadyLayerRise(width=3)
    ...     for t in range(160):
    ...         common = rng.normal(0.0, 0.3)                       # batch noise every layer shares
    ...         own = common + rng.normal(0.0, 0.05, 3) + np.array([np.log(rate) * max(0, t - 80), 0.0, 0.0])
    ...         rest = np.log([np.sqrt(np.exp(2 * own).sum() - np.exp(2 * o)) for o in own])
    ...         hit = test.update(own, own - rest)
    ...         if hit.any():
    ...             return t, np.flatnonzero(hit).tolist()
    >>> first(1.05)              # layer 0 compounds 5%/step from step 80
    (108, [0])
    >>> first(1.0) is None       # nothing grows
    True
    """

    def __init__(self, width: int, window: int = 10, horizon: int = 50, ratio: float = 3.0, span: int = 30,
                 t_own: float = 5.0, t_rel: float = 15.0, base_window: int = 20) -> None:
        self.width, self.window, self.horizon, self.h = width, window, horizon, math.log(ratio)
        self.span, self.t_own, self.t_rel = span, t_own, t_rel
        self.base_window = max(base_window, window)
        #: The last rows of (own, rel), and the baseline candidates (median-of-base_window levels) of each.
        self._raw: deque[np.ndarray] = deque(maxlen=max(self.base_window, span))
        self._levels: deque[np.ndarray] = deque(maxlen=horizon + 1)
        #: Per layer: the factor of its own rise over the baseline (1 where not judged), for the message.
        self.factor = np.ones(width)

    def update(self, own: np.ndarray, rel: np.ndarray) -> np.ndarray:
        """Add one step's per-layer log norms and shares (log norm minus the rest's); return the mask of the
        layers that rise steadily now."""
        row = np.stack([np.asarray(own, dtype=np.float64), np.asarray(rel, dtype=np.float64)])
        if row.shape[1] != self.width:
            self.width, self.factor = row.shape[1], np.ones(row.shape[1])
            self._raw.clear()
            self._levels.clear()
        self._raw.append(row)
        hit = np.zeros(self.width, dtype=bool)
        if len(self._raw) >= self.base_window:
            self._levels.append(self._level(self.base_window))
        if len(self._levels) < self.horizon + 1 or len(self._raw) < self.span:
            return hit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a layer without gradient all along: NaN
            rise = self._level(self.window) - np.nanmin(np.stack(list(self._levels)), axis=0)
        y = np.stack(list(self._raw)[-self.span:])  # (span, 2, width)
        t = _slope_t(y)
        ok = np.isfinite(rise) & np.isfinite(t)
        hit = ok.all(axis=0) & (np.nan_to_num(rise) >= self.h).all(axis=0) & (np.nan_to_num(t[0]) >= self.t_own) \
            & (np.nan_to_num(t[1]) >= self.t_rel)
        self.factor = np.where(np.isfinite(rise[0]), np.exp(np.nan_to_num(rise[0])), 1.0)
        return hit

    def reset(self) -> None:
        """Forget the baselines (keep the raw window): rises are judged from here on."""
        self._levels.clear()

    def _level(self, n: int) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(np.stack(list(self._raw)[-n:]), axis=0)

    def state_dict(self) -> dict[str, Any]:
        return {"raw": list(self._raw), "levels": list(self._levels), "width": self.width}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.width = int(state.get("width", self.width))
        self.factor = np.ones(self.width)
        self._raw = deque(state.get("raw", []), maxlen=max(self.base_window, self.span))
        self._levels = deque(state.get("levels", []), maxlen=self.horizon + 1)


def _slope_t(y: np.ndarray) -> np.ndarray:
    """t-statistic of the least-squares slope of each column of ``y`` against time (axis 0); NaN where a column
    holds a NaN."""
    n = y.shape[0]
    x = np.arange(n, dtype=np.float64) - (n - 1) / 2
    x = x.reshape((n,) + (1,) * (y.ndim - 1))
    sxx = float((x ** 2).sum())
    dev = y - y.mean(axis=0)
    b = (x * dev).sum(axis=0) / sxx
    resid = dev - b * x
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt((resid ** 2).sum(axis=0) / max(n - 2, 1) / sxx)
        return np.where(se > 0, b / se, np.where(b > 0, np.inf, 0.0))
