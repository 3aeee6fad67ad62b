"""``noise_scale``: the gradient noise scale, and a global batch far above it (diminishing returns).

The simple noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training") predicts the most useful batch size: training with batch ``B`` needs about
``S_min (1 + B_simple / B)`` steps and ``E_min (1 + B / B_simple)`` samples. Far above the noise scale a larger batch
buys almost no fewer steps for its extra compute: at ``B = 10 B_simple`` halving the batch costs about 5% more
steps and saves nearly half the samples.

DDP gives the paper's two-batch estimator (its appendix A.1) for free: each rank's local, pre-allreduce gradient
(``StepStats.rank_norm``) is a small-batch gradient of ``b`` samples, the merged gradient (the global norm) a
large-batch one of ``B = W b``. :func:`gfservice.stats.noise_scale` gives the unbiased estimates of ``|G|^2`` and
``tr(Sigma)`` of one step from the mean of the ranks' squared local norms and the squared global norm. One step's
estimates are very noisy (``|G|^2`` often comes out negative), so, as the paper recommends, each is smoothed with
an exponential moving average (weight ``ema`` per step) before dividing. Nothing is judged before ``warmup``
steps have been averaged.

The estimate is in units of the per-rank batch unless a batch size is configured: ``per_rank_batch`` (samples per
rank and optimizer step, micro-batches times accumulation), else ``global_batch / W``. With ``global_batch`` set
(samples per optimizer step, all ranks), an ``info`` finding (never more: it is advice, and the noise scale grows
as training goes on) says so while the global batch is more than ``ratio`` times the noise scale; with the
default ``global_batch = None`` the detector only estimates (:attr:`NoiseScale.estimate`, and the exporter's
``gradflow_noise_scale`` gauge gives a per-step estimate on every DDP run).

Where it is wrong: a GradScaler's loss scale is divided out of the local norms (they are taken before
unscaling; steps where the scale changed are skipped), but a scaler the monitor was not given is not; while
gradient clipping bites, the merged norm is the clipped one and the estimate comes out too high (the finding then
stays silent). FSDP ranks report shard norms, for which the estimate is negative and nothing is judged. Needs
2 or more ranks with local norms.

>>> from gfservice.testing import make_step, replay
>>> rng = np.random.default_rng(0)
>>> steps = []         # 4 ranks of 16 samples; per sample |G|^2 = 1 and tr(Sigma) = 2: B_simple = 2 samples
>>> for i in range(200):
...     g = 50**-0.5 + rng.normal(0, (2 / 50 / 16) ** 0.5, (4, 50))    # each rank's gradient, 50 parameters
...     steps.append(make_step(step=i, sum_sq=[(g.mean(0) ** 2).sum()], rank_norm=np.sqrt((g**2).sum(1))))
>>> det = NoiseScale(per_rank_batch=16, global_batch=64)             # 64 samples: 32x the noise scale
>>> f = replay(det, steps)[0]
>>> f.step, f.severity.value, round(det.estimate, 1)
(99, 'info', 2.0)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats
from gfservice.stats import noise_scale


class NoiseScale(Detector):
    """The gradient noise scale B_simple from DDP ranks' local norms; info when the global batch is far above it."""

    name = "noise_scale"

    class Config(DetectorConfig):
        #: Samples per rank and optimizer step (None: global_batch / ranks, else the estimate is in per-rank batches).
        per_rank_batch: int | None = Field(None, ge=1)
        #: Samples per optimizer step over all ranks (None: estimate only, never judge).
        global_batch: int | None = Field(None, ge=1)
        #: An info finding while the global batch exceeds this many times the noise scale.
        ratio: float = Field(10.0, gt=1.0)
        #: Weight of each step in the moving averages of |G|^2 and tr(Sigma) (0.02: about 50 steps).
        ema: float = Field(0.02, gt=0.0, le=1.0)
        #: Steps averaged before the estimate is judged.
        warmup: int = Field(100, ge=1)

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._grad_sq = 0.0
        self._trace = 0.0
        self._seen = 0
        self._ranks = 0
        self._last_scale: float | None = None

    @property
    def estimate(self) -> float:
        """The smoothed noise scale: in samples when a batch size is known, else in per-rank batches (NaN: none)."""
        if self._seen == 0 or self._grad_sq <= 0 or self._trace < 0:
            return math.nan
        return self._trace / self._grad_sq * self._per_rank_batch()

    def _per_rank_batch(self) -> float:
        cfg = self.config
        if cfg.per_rank_batch is not None:
            return float(cfg.per_rank_batch)
        if cfg.global_batch is not None and self._ranks:
            return cfg.global_batch / self._ranks
        return 1.0

    def update(self, step: StepStats) -> list[Finding] | None:
        norms = step.rank_norm
        if norms is None or step.skipped:
            return None
        local_sq = np.asarray(norms, dtype=np.float64) ** 2
        global_sq = step.global_norm**2
        if np.count_nonzero(np.isfinite(local_sq)) < 2 or not math.isfinite(global_sq):
            return None
        scale, self._last_scale = self._last_scale, step.loss_scale
        if step.loss_scale is not None:
            if scale != step.loss_scale or not step.loss_scale > 0:
                return None  # the scale changed: which one the local gradients carry is unclear
            local_sq = local_sq / step.loss_scale**2
        _, grad_sq, trace = noise_scale(local_sq, global_sq)
        if not (math.isfinite(grad_sq) and math.isfinite(trace)):
            return None
        a = self.config.ema if self._seen else 1.0
        self._grad_sq += a * (grad_sq - self._grad_sq)
        self._trace += a * (trace - self._trace)
        self._seen += 1
        self._ranks = int(np.count_nonzero(np.isfinite(local_sq)))
        cfg = self.config
        b_noise = self.estimate
        if cfg.global_batch is None or self._seen < cfg.warmup or not b_noise > 0:
            return []
        if cfg.global_batch <= cfg.ratio * b_noise:
            return []
        return [self.finding(
            step, "info",
            f"the global batch of {cfg.global_batch} samples is {cfg.global_batch / b_noise:.0f}x the gradient noise "
            f"scale (B_simple about {b_noise:.3g} samples, averaged over the last ~{round(1 / cfg.ema)} steps) at step "
            f"{step.step}: past the noise scale a larger batch buys few fewer steps (McCandlish et al. 2018); a "
            "smaller global batch, or fewer ranks, would train about as fast per step for much less compute",
            value=b_noise, threshold=cfg.global_batch / cfg.ratio, key="batch",
        )]

    def state_dict(self) -> dict[str, Any]:
        return {"grad_sq": self._grad_sq, "trace": self._trace, "seen": self._seen, "ranks": self._ranks,
                "last_scale": self._last_scale}

    def load_state_dict(self, state) -> None:
        self._grad_sq = float(state.get("grad_sq", 0.0))
        self._trace = float(state.get("trace", 0.0))
        self._seen = int(state.get("seen", 0))
        self._ranks = int(state.get("ranks", 0))
        last = state.get("last_scale")
        self._last_scale = None if last is None else float(last)
