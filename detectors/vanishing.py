"""``vanishing``: gradients that have all but disappeared from part of the network, persistently.

A layer is *vanishing* at a step when either

- its gradient RMS is more than ``orders`` orders of magnitude below the median layer's, or
- its mean |g| is below ``floor`` (on deep steps; the RMS, an upper bound of mean |g|, otherwise).
  The default floor of 1e-7 is the threshold of SageMaker Debugger's built-in ``VanishingGradient`` rule.

A finding is raised once some layers have been vanishing for ``window`` consecutive collected steps, and it
names them as a range ("layers 0.weight to 8.bias"). A healthy 20-layer ReLU network spans about one to two
orders of magnitude between its layers; the default of 3 orders leaves room for that.

>>> from gfservice.testing import make_step, replay
>>> healthy = [1e-2] * 6
>>> dying = [1e-12, 1e-10] + [1e-2] * 4          # the first two layers' gradients are gone
>>> steps = [make_step(step=i, sum_sq=healthy) for i in range(5)]
>>> steps += [make_step(step=i, sum_sq=dying) for i in range(5, 20)]
>>> first = replay(Vanishing(window=5), steps)[0]      # it fires at every step while it persists
>>> first.step, first.layers, first.severity.value
(9, ['layer0', 'layer1'], 'warning')
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gfservice.api import Detector, DetectorConfig, Finding, StepStats, describe_layers


class Vanishing(Detector):
    """Vanishing gradients: layers orders of magnitude below the median layer, or under an absolute floor."""

    name = "vanishing"

    class Config(DetectorConfig):
        orders: float = 3.0
        floor: float = 1e-7
        window: int = 10

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._streak: np.ndarray | None = None

    def update(self, step: StepStats) -> list[Finding]:
        g = step.grads
        live = g.count > 0
        if not live.any():
            return []
        rms = g.rms
        with np.errstate(divide="ignore", invalid="ignore"):
            finite = np.isfinite(rms)
            median = float(np.median(rms[live & finite])) if (live & finite).any() else 0.0
            relative = live & finite & (rms < median * 10.0 ** (-self.config.orders))
            magnitude = g.mean_abs if g.mean_abs is not None else rms
            below_floor = live & finite & (magnitude < self.config.floor)
        flagged = relative | below_floor
        if self._streak is None or self._streak.shape != flagged.shape:
            self._streak = np.zeros(flagged.shape, dtype=np.int64)
        self._streak = np.where(flagged, self._streak + 1, 0)
        persistent = np.flatnonzero(self._streak >= self.config.window)
        if persistent.size == 0:
            return []
        names = [g.layers[i] for i in persistent]
        worst = float(np.min(rms[persistent]))
        ratio = worst / median if median > 0 else 0.0
        why = (f"{ratio:.1e} of the median layer's" if relative[persistent].any() else
               f"under the floor {self.config.floor:.0e}")
        return [
            self.finding(
                step,
                "warning",
                f"{describe_layers(names)} have had vanishing gradients for {self.config.window}+ steps "
                f"(RMS down to {worst:.2e}, {why}) at step {step.step}; consider residual connections, "
                "normalisation, a non-saturating activation or a better initialisation",
                layers=names,
                value=worst,
                threshold=median * 10.0 ** (-self.config.orders) if relative[persistent].any() else self.config.floor,
                key="layers",
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self._streak}

    def load_state_dict(self, state) -> None:
        self._streak = state.get("streak")
