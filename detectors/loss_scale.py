"""``loss_scale``: the loss scale of a GradScaler collapses, or the scaler skips most steps.

fp16 mixed precision multiplies the loss by a scale before backward; torch's ``GradScaler`` halves the scale
and skips the optimizer step whenever the scaled gradients overflow, and doubles it after 2000 clean steps.
A scale that keeps halving means gradients that overflow fp16 at any scale (an op whose fp16 backward gives
Inf, a diverging run): every skipped step is a lost step, and once the scale is far below 1 the run is dead.
``StepStats.loss_scale`` (the scale after ``scaler.update()``) and ``skipped`` (the scale went down) drive three
checks, each its own finding key:

- ``floor`` (critical): the scale fell below ``min_scale`` (default 1.0: the gradients overflow fp16 even
  unscaled, the run cannot recover by itself);
- ``collapse`` (warning): ``max_halvings`` (default 8, a factor 256) halvings within the last ``window``
  (default 20) collected steps;
- ``skips`` (warning): more than ``max_skip_fraction`` (default 0.25) of the last ``skip_window`` (default
  100) collected steps were skipped (a slow bleed, with a scaler that grows the scale back in between).

The scaler's normal behaviour stays silent: the halvings of its initial calibration (from 65536 down to the
level the model's gradients allow, a streak of skipped steps from the first step; fp16 runs commonly halve
several times there) are not counted, and after calibration a healthy scaler halves about once per growth
(every ``growth_interval``, 2000 steps by default), so 8 halvings in 20 steps is far outside its routine. A run
that is broken from its first step still reaches the floor. On the evaluation zoo (``benchmarks/zoo.py``) the healthy
fp16 run (MLP, SGD, ``GradScaler``) never skips a step in 300 (15 seeds); the ``scaler_collapse`` scenario (an
Inf gradient every step from step 100: the scale halves at every step) is reported at step 107 (``collapse``,
the 8th halving) and is critical at step 116 (scale 0.5).

>>> from gfservice.testing import make_step, replay
>>> scales = [65536.0, 32768.0, 16384.0] + [16384.0] * 17 + [16384.0 / 2**k for k in range(1, 21)]
>>> steps = [make_step(step=i, sum_sq=[1.0], loss_scale=s, skipped=i > 0 and s < scales[i - 1])
...          for i, s in enumerate(scales)]
>>> [(f.step, f.key, f.severity.value) for f in replay(LossScale(), steps) if f.step in (27, 34)]
[(27, 'collapse', 'warning'), (34, 'floor', 'critical'), (34, 'collapse', 'warning')]
>>> LossScale().update(make_step(sum_sq=[1.0])) is None      # no GradScaler: not judged
True
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats


class LossScale(Detector):
    """GradScaler loss scale collapsing (many halvings, or below a floor) or skipping most steps."""

    name = "loss_scale"

    class Config(DetectorConfig):
        #: Halvings within ``window`` collected steps that count as a collapse (warning).
        max_halvings: int = Field(8, ge=1)
        window: int = Field(20, ge=1)
        #: A scale below this is critical: the gradients overflow fp16 even unscaled.
        min_scale: float = Field(1.0, ge=0)
        #: Largest tolerated fraction of skipped steps among the last ``skip_window`` collected steps.
        max_skip_fraction: float = Field(0.25, gt=0, le=1)
        skip_window: int = Field(100, ge=10)

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._last: float | None = None
        #: Still in the scaler's initial calibration (only skipped steps so far).
        self._calibrating = True
        self._halvings: deque[int] = deque(maxlen=self.config.window)
        self._skips: deque[bool] = deque(maxlen=self.config.skip_window)

    def update(self, step: StepStats) -> list[Finding] | None:
        scale = step.loss_scale
        if scale is None or not math.isfinite(scale):
            return None  # no GradScaler in this run (or nothing known at this step)
        cfg = self.config
        halvings = 0
        if self._last is not None and 0 < scale < self._last:
            halvings = round(math.log2(self._last / scale))
        elif self._last is not None and scale <= 0 < self._last:
            halvings = cfg.max_halvings  # a scale of zero: as collapsed as it gets
        skipped = bool(step.skipped or halvings > 0)
        if self._calibrating and not skipped and self._last is not None:
            self._calibrating = False
        self._last = scale
        self._halvings.append(0 if self._calibrating else halvings)
        self._skips.append(skipped and not self._calibrating)
        out: list[Finding] = []
        if scale < cfg.min_scale:
            out.append(self.finding(
                step, "critical",
                f"the loss scale fell to {scale:.3g}, below {cfg.min_scale:g}, at step {step.step}: the gradients "
                "overflow fp16 even unscaled and every step is skipped; look for the op that gives Inf in backward "
                "(run a step with torch.autograd.detect_anomaly), lower the learning rate, or train in bf16",
                value=scale, threshold=cfg.min_scale, key="floor"))
        recent = sum(self._halvings)
        if recent >= cfg.max_halvings:
            out.append(self.finding(
                step, "warning",
                f"the loss scale was halved {recent} times in the last {len(self._halvings)} steps, to {scale:.3g} "
                f"at step {step.step}: the scaled gradients overflow at every step; look for the op that gives "
                "Inf in backward (torch.autograd.detect_anomaly) or a diverging loss",
                value=recent, threshold=cfg.max_halvings, key="collapse"))
        if len(self._skips) >= cfg.skip_window:
            frac = sum(self._skips) / len(self._skips)
            if frac > cfg.max_skip_fraction:
                out.append(self.finding(
                    step, "warning",
                    f"the GradScaler skipped {frac:.0%} of the last {len(self._skips)} steps (now step {step.step}, "
                    f"loss scale {scale:.3g}): those steps do not train; look for overflowing gradients "
                    "(torch.autograd.detect_anomaly) or lower the learning rate",
                    value=frac, threshold=cfg.max_skip_fraction, key="skips"))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"last": self._last, "calibrating": self._calibrating, "halvings": list(self._halvings),
                "skips": list(self._skips)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._last = state.get("last")
        self._calibrating = bool(state.get("calibrating", True))
        self._halvings = deque((int(h) for h in state.get("halvings", [])), maxlen=self.config.window)
        self._skips = deque((bool(s) for s in state.get("skips", [])), maxlen=self.config.skip_window)
