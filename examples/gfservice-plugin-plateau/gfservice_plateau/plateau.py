"""``plateau``: the training loss stopped improving.

A run whose loss has flattened out is either done or stuck (a learning rate decayed too far or too small,
a data loader that repeats one shard, a frozen model). This detector follows the loss the way PyTorch's
``ReduceLROnPlateau`` follows a validation metric (mode ``min``, relative threshold): it smooths the noisy
per-step loss with an exponential moving average over about ``smoothing`` steps, keeps the best smoothed value,
and raises a finding once the smoothed loss has not improved on that best by ``min_improvement`` (relative, of
its magnitude) for ``patience`` consecutive steps that reported a loss. The finding clears as soon as the loss
improves again. Steps without a finite loss are not judged (``update`` returns ``None``): NaN/Inf losses are
``nonfinite``'s business.

It is **off unless enabled** (``[detectors.plateau]`` with ``enabled = true``) and reports ``info`` by default
(shown, no ticket): a plateau is a fact about the run, not always a fault. A run that should still be learning
can raise it to ``warning``.

A loss that falls for 300 steps, then stays flat: with ``patience`` 100 the finding comes 100 steps after the
smoothed loss last improved by 1% (the moving average trails the loss by about ``smoothing / 2`` steps and
settles onto the plateau by step 386):

>>> import numpy as np
>>> from gfservice.testing import make_step, replay
>>> rng = np.random.default_rng(0)
>>> losses = np.r_[np.linspace(2.0, 0.5, 300), np.full(200, 0.5)] * np.exp(rng.normal(0, 0.05, 500))
>>> steps = [make_step(step=i, sum_sq=[1.0], loss=float(v)) for i, v in enumerate(losses)]
>>> findings = replay(Plateau(patience=100), steps)     # reported at every step while the plateau lasts
>>> f = findings[0]
>>> f.step, f.severity.value, f.key
(486, 'info', 'plateau')
>>> f.message
'the loss has not improved by 1% for 100 steps (smoothed 0.498, best 0.502 at step 386) at step 486; ...'
>>> Plateau().update(make_step(sum_sq=[1.0])) is None     # no loss reported: not judged
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats


class Plateau(Detector):
    """Loss plateau: the smoothed training loss has not improved for ``patience`` steps."""

    name = "plateau"

    class Config(DetectorConfig):
        #: Opt-in: a plateau is not always a fault.
        enabled: bool = False
        #: Steps with a loss, without improvement, before the finding is raised.
        patience: int = Field(500, ge=1)
        #: Smallest improvement that counts, relative to the best smoothed loss's magnitude.
        min_improvement: float = Field(0.01, ge=0, lt=1)
        #: Span of the exponential moving average of the loss, in steps (alpha = 2 / (span + 1)).
        smoothing: int = Field(50, ge=1)
        #: ``info`` (shown only) or ``warning`` (a ticket) when a plateau means a stuck run.
        severity: Literal["info", "warning"] = "info"

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._ema: float | None = None
        self._best: float | None = None
        self._best_step = 0
        self._since = 0  # steps since the last improvement

    def update(self, step: StepStats) -> list[Finding] | None:
        loss = step.loss
        if loss is None or not math.isfinite(loss):
            return None  # nothing to judge at this step; the current finding stands
        cfg = self.config
        alpha = 2.0 / (cfg.smoothing + 1)
        self._ema = loss if self._ema is None else (1 - alpha) * self._ema + alpha * loss
        if self._best is None or self._ema < self._best - cfg.min_improvement * abs(self._best):
            self._best, self._best_step, self._since = self._ema, step.step, 0
            return []
        self._since += 1
        if self._since < cfg.patience:
            return []
        return [
            self.finding(
                step,
                cfg.severity,
                f"the loss has not improved by {cfg.min_improvement:.0%} for {self._since} steps (smoothed "
                f"{self._ema:.3g}, best {self._best:.3g} at step {self._best_step}) at step {step.step}; if the run "
                "should still be learning, check the learning rate schedule (decayed too far?), that the data "
                "loader does not repeat the same batches, and that the optimizer holds every trainable parameter",
                value=self._since,
                threshold=cfg.patience,
                key="plateau",
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self._ema, "best": self._best, "best_step": self._best_step, "since": self._since}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._ema = state.get("ema")
        self._best = state.get("best")
        self._best_step = int(state.get("best_step", 0))
        self._since = int(state.get("since", 0))
