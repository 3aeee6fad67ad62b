"""``underflow``: gradient values too small for a low-precision format, which would flush to zero in it.

Mixed-precision training keeps gradients in fp16, bf16 or fp8 somewhere along the way (autocast backward
passes, gradient all-reduce in low precision, fp8 GEMMs). A gradient value below the format's smallest
subnormal number becomes zero there, and that part of the signal is lost. This detector reads the exponent
histogram of the deep statistics (``GradStats.underflow_fraction``) and warns when more than ``max_fraction``
of a layer's non-zero gradient values lie below ``format``'s smallest subnormal. Steps without deep statistics
are not judged: ``update`` returns ``None`` and the service keeps this detector's findings as they are.

It is off unless configured (``[detectors.underflow]`` with ``enabled = true``): it only means something
where gradients really pass through that format unscaled, such as a low-precision gradient all-reduce. The
monitor sees gradients after a ``GradScaler`` has unscaled them, and an fp32 run has gradients below 6e-8 as
a matter of course (a healthy 20-layer ReLU MLP on digits does, in its last layer).

The histogram resolves powers of two, so a value within a factor of two below the smallest subnormal, which
rounding may lift to it, counts as flushed: the fraction is an upper bound.

Two layers; the first one's gradients shrink tenfold per step, the second's stay at 1e-2. fp16's smallest
subnormal is 2**-24, about 6e-8; at step 6 (standard deviation 1e-6) about 4% of the first layer's values are
below it:

>>> import numpy as np
>>> from gfservice.api import StepStats
>>> from gfservice.stats import GradStats
>>> from gfservice.testing import replay
>>> rng = np.random.default_rng(0)
>>> def deep_step(i):
...     grads = {"embed.weight": rng.normal(0, 10.0 ** -i, 4000), "head.weight": rng.normal(0, 1e-2, 4000)}
...     return StepStats(run="doc", step=i, grads=GradStats.from_arrays(grads, deep=True))
>>> steps = [deep_step(i) for i in range(9)]
>>> findings = replay(Underflow(), steps)               # it fires at every step while it persists
>>> f = findings[0]
>>> f.step, f.layers, f.severity.value, round(f.value, 3)
(6, ['embed.weight'], 'warning', 0.041)
>>> f.message
'4.1% of the non-zero gradient values of layer embed.weight would flush to zero in fp16 at step 6; ...'
>>> replay(Underflow(format="fp8_e4m3"), steps[:1])[0].layers   # below 2**-9 is lost: unscaled 1e-2 suffers
['head.weight']
>>> from gfservice.testing import make_step
>>> Underflow().update(make_step(sum_sq=[1.0])) is None       # no deep statistics: not judged
True
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats, describe_layers


class Underflow(Detector):
    """Gradient underflow: a share of a layer's gradient values would flush to zero in fp16, bf16 or fp8."""

    name = "underflow"

    class Config(DetectorConfig):
        #: Opt-in: only meaningful where the gradients really pass through ``format``.
        enabled: bool = False
        #: The low-precision format the gradients pass through.
        format: Literal["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"] = "fp16"
        #: Largest tolerated fraction of a layer's non-zero gradient values below the format's smallest subnormal.
        max_fraction: float = Field(0.01, gt=0, le=1)

    def update(self, step: StepStats) -> list[Finding] | None:
        cfg = self.config
        frac = step.grads.underflow_fraction(cfg.format, subnormal=True)
        if frac is None:
            return None  # not a deep step: nothing to judge, the current findings stand
        hot = np.flatnonzero(frac > cfg.max_fraction)
        if hot.size == 0:
            return []
        names = [step.layers[i] for i in hot]
        worst = float(frac[hot].max())
        return [
            self.finding(
                step,
                "warning",
                f"{worst:.1%} of the non-zero gradient values of {describe_layers(names)} would flush to zero "
                f"in {cfg.format} at step {step.step}; scale the loss (torch.amp.GradScaler, or per-tensor "
                "scaling for fp8) or keep these gradients in a wider format",
                layers=names,
                value=worst,
                threshold=cfg.max_fraction,
                key=cfg.format,
            )
        ]
