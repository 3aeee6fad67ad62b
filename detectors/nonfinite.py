"""``nonfinite``: NaN or Inf in the gradients (or the loss), reported at the very step, naming the layers and,
where the ranks' local gradients are known, the ranks that produced them.

It fires on actual NaN/Inf values only: a layer with a non-finite count above 0 (or a NaN/Inf max |g|), a rank
whose local gradients held NaN/Inf before they were reduced, or a NaN/Inf loss (``check_loss``). A sum of
squares that is Inf while every value is finite is a huge gradient, not a non-finite one: ``exploding`` reports
it (the collector recomputes such sums in float64). The message states the counts it has.

>>> from gfservice.testing import make_step, replay
>>> steps = [make_step(step=i, sum_sq=[1.0, 2.0, 3.0]) for i in range(3)]
>>> steps.append(make_step(step=3, sum_sq=[1.0, float("inf"), 3.0], nonfinite=[0, 7, 0],
...                        rank_nonfinite=[False, True]))
>>> f, = replay(NonFinite(), steps)
>>> f.step, f.severity.value, f.layers, f.ranks
(3, 'critical', ['layer1'], [1])
>>> f.message
'non-finite gradients (7 NaN/Inf values) in layer layer1 at step 3, from rank 1; ...'
>>> huge = make_step(step=4, sum_sq=[1.0, float("inf")], max_abs=[0.1, 3e30])   # every value finite
>>> replay(NonFinite(), [huge])                                                   # exploding's, not ours
[]
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, Severity, StepStats, describe_layers


class NonFinite(Detector):
    """NaN or Inf gradient values or loss: critical, at the step they appear, naming layers and ranks."""

    name = "nonfinite"

    class Config(DetectorConfig):
        #: Also report a NaN/Inf loss (the gradients are then usually non-finite too).
        check_loss: bool = True
        #: With a GradScaler, overflow at a too-high loss scale is routine: the scaler skips the step and
        #: lowers the scale. Such steps are reported as ``info`` instead of ``critical``.
        scaler_skips_are_info: bool = True
        #: Non-finite steps this many times in a row at the same interval are one ``periodic`` finding.
        period_repeats: int = Field(3, ge=2)

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._bad_steps: list[int] = []  # the last non-finite steps (not scaler skips)

    def update(self, step: StepStats) -> list[Finding]:
        g = step.grads
        counts = np.asarray(g.nonfinite, dtype=np.int64)
        bad = g.nonfinite_layers  # also a sender that flags NaN/Inf by the maximum alone
        ranks: list[int] = []
        if step.rank_nonfinite is not None:
            ranks = step.ranks_of(step.rank_nonfinite)[np.asarray(step.rank_nonfinite, dtype=bool)].tolist()
        severity = Severity.info if (step.skipped and self.config.scaler_skips_are_info) else Severity.critical
        out: list[Finding] = []
        origin = f", from rank {', '.join(map(str, ranks))}" if ranks else ""
        advice = ("check the inputs and learning rate of that step, or lower the loss scale; gradient clipping "
                  "cannot repair NaN/Inf (a NaN norm spreads NaN to every gradient): skip such steps")
        if bad.any():
            idx = np.flatnonzero(bad)
            names = [g.layers[i] for i in idx]
            count = int(counts[idx].sum())
            uncounted = int(np.count_nonzero(counts[idx] == 0))
            if count and not uncounted:
                what = f"{count} NaN/Inf values"
            elif count:
                what = f"{count} NaN/Inf values counted, more in {uncounted} layers with a NaN/Inf max |g|"
            else:
                what = "NaN/Inf max |g|, values not counted"
            out.append(
                self.finding(
                    step,
                    severity,
                    f"non-finite gradients ({what}) in {describe_layers(names)} at step {step.step}{origin}; "
                    + advice,
                    layers=names,
                    ranks=ranks,
                    value=count,
                    threshold=0,
                    key="grad",
                )
            )
        elif ranks:
            out.append(
                self.finding(
                    step,
                    severity,
                    f"the local gradients of rank {', '.join(map(str, ranks))} held NaN/Inf values before they "
                    f"were reduced at step {step.step} (the merged gradients show none); " + advice,
                    ranks=ranks,
                    value=len(ranks),
                    threshold=0,
                    key="grad",
                )
            )
        loss_bad = self.config.check_loss and step.loss is not None and not math.isfinite(step.loss)
        if severity == "critical" and (bad.any() or ranks or loss_bad):
            periodic = self._periodic(step)
            if periodic is not None:
                return [periodic]
        if loss_bad:
            out.append(
                self.finding(
                    step,
                    "critical",
                    f"the loss is {step.loss} at step {step.step}{origin}; check that batch's inputs and labels and "
                    "the loss computation (a log or division of 0), and the learning rate",
                    ranks=ranks,
                    value=step.loss,
                    key="loss",
                )
            )
        return out

    def _periodic(self, step: StepStats) -> Finding | None:
        """One finding for NaN/Inf that recurs at a fixed interval (a batch or hook that comes back every k
        steps), once ``period_repeats`` intervals agree; it replaces the per-occurrence findings from then on."""
        n = self.config.period_repeats
        self._bad_steps = [*self._bad_steps[-n:], step.step]
        gaps = np.diff(self._bad_steps[-(n + 1):])
        if len(gaps) < n or len(set(gaps.tolist())) != 1 or gaps[0] <= 1:
            return None
        k = int(gaps[0])
        seen = ", ".join(map(str, self._bad_steps[-(n + 1):]))
        return self.finding(
            step, "critical",
            f"NaN/Inf recurs every {k} steps (steps {seen}): something periodic produces it, a batch that comes "
            f"back every {k} steps (a corrupt sample or shard, a data-loader epoch boundary) or a hook or "
            "evaluation that runs on that period; inspect those batches. Gradient clipping does not help here "
            "(a NaN norm spreads NaN to every gradient)",
            value=k, threshold=n, key="periodic")

    def state_dict(self) -> dict[str, Any]:
        return {"bad_steps": list(self._bad_steps)}

    def load_state_dict(self, state: Any) -> None:
        self._bad_steps = list(state.get("bad_steps", []))
