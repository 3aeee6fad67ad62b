"""``nonfinite``: NaN or Inf in the gradients (or the loss), reported at the very step, naming the layers
and, where the ranks' local gradients are known, the ranks that produced them.

>>> from gfservice.testing import make_step, replay
>>> steps = [make_step(step=i, sum_sq=[1.0, 2.0, 3.0]) for i in range(3)]
>>> steps.append(make_step(step=3, sum_sq=[1.0, float("inf"), 3.0], nonfinite=[0, 7, 0],
...                        rank_nonfinite=[False, True]))
>>> f, = replay(NonFinite(), steps)
>>> f.step, f.severity.value, f.layers, f.ranks
(3, 'critical', ['layer1'], [1])
>>> f.message
'non-finite gradients (7 NaN/Inf values) in layer layer1 at step 3, from rank 1; ...'
"""

from __future__ import annotations

import math

import numpy as np

from gfservice.api import Detector, DetectorConfig, Finding, StepStats, describe_layers


class NonFinite(Detector):
    """NaN or Inf gradient values or loss: critical, at the step they appear, naming layers and ranks."""

    name = "nonfinite"

    class Config(DetectorConfig):
        #: Also report a NaN/Inf loss (the gradients are then usually non-finite too).
        check_loss: bool = True
        #: With a GradScaler, overflow at a too-high loss scale is routine: the scaler skips the step and
        #: lowers the scale. Such steps are reported as ``info`` instead of ``critical``.
        scaler_skips_are_info: bool = True

    def update(self, step: StepStats) -> list[Finding]:
        g = step.grads
        bad = (g.nonfinite > 0) | ~np.isfinite(g.sum_sq) | ~np.isfinite(g.max_abs)
        out = []
        ranks: list[int] = []
        if step.rank_nonfinite is not None:
            ranks = np.flatnonzero(np.asarray(step.rank_nonfinite, dtype=bool)).tolist()
        severity = "info" if (step.skipped and self.config.scaler_skips_are_info) else "critical"
        if bad.any():
            names = [g.layers[i] for i in np.flatnonzero(bad)]
            count = int(g.nonfinite[bad].sum())
            origin = f", from rank {', '.join(map(str, ranks))}" if ranks else ""
            out.append(
                self.finding(
                    step,
                    severity,
                    f"non-finite gradients ({count} NaN/Inf values) in {describe_layers(names)} at step "
                    f"{step.step}{origin}; check the inputs and learning rate of that step, lower the loss "
                    "scale or enable gradient clipping",
                    layers=names,
                    ranks=ranks,
                    value=count,
                    threshold=0,
                    key="grad",
                )
            )
        if self.config.check_loss and step.loss is not None and not math.isfinite(step.loss):
            out.append(
                self.finding(
                    step,
                    "critical",
                    f"loss is {step.loss} at step {step.step}",
                    ranks=ranks,
                    value=step.loss,
                    key="loss",
                )
            )
        return out
