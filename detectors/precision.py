"""``precision``: gradient values that underflow (or would overflow) the low-precision format the job uses.

Mixed-precision training passes gradients through fp16, bf16 or fp8 somewhere (the backward of autocast ops,
a low-precision gradient all-reduce, fp8 GEMMs). A value below the format's smallest subnormal flushes to zero
there; below its smallest normal it keeps only a few bits; above its largest finite value it overflows to Inf.
From the exponent histogram of the deep statistics this detector takes, per layer, the share of the non-zero
gradient values below the ``limit`` and the share that would overflow (values of at least twice the largest
power of two below the format's maximum, :data:`gfservice.stats.FORMAT_MAX`: certain overflow, a lower bound),
and warns when more than ``max_fraction`` of a layer's values underflow, or more than
``max_overflow_fraction`` would overflow, at ``window`` consecutive deep steps (default 2). The finding names
the layers. Steps without deep statistics are not judged (``None``).

Which format: ``format`` when it is set. When it is not (the default): fp16 when the run reports a loss
scale (``StepStats.loss_scale``: a ``GradScaler``, fp16 automatic mixed precision); else the format the run
itself says, read by the monitor at each collected step: the parameters' dtype (``StepStats.precision``: a
``model.half()`` or ``model.bfloat16()`` run, whose gradients are held in that format), or autocast's
(``StepStats.autocast``, when autocast is on as the step is collected); not judged otherwise (fp32, or a sender
that does not say). Set ``format`` for a low-precision all-reduce or for fp8 (``fp8_e4m3``, ``fp8_e5m2``:
per-tensor scaling aside, the values are judged as they are).

Gradients held in fp16 without a loss scale flush to exactly zero where they underflow, so the histogram shows
nothing below the format: for those runs, a layer's zeros beyond its own structural level (the smallest share
of zeros it had at a deep step) count as underflow too, where more than ``max_fraction`` of the values went to
zero in at least half the judged layers (a loss too small for fp16 reaches every layer; a dead ReLU, one
layer: ``dead_units``). The ``fp16_model_underflow`` scenario (the digits MLP in fp16, loss x1e-6) has every
gradient value of every layer exactly zero from the first deep step on; the healthy ``fp16_model`` keeps its
share of zeros within 0.01 of its first deep step's (at most 5% of a layer).

With a loss scale the gradients have already been through fp16, scaled: the monitor sees them after
``GradScaler`` has unscaled them. The histogram is shifted by log2 of the scale that step used before it is
judged, and since the values that flushed to zero are zeros by then (not counted), what remains visible is the
values that survived in fp16's subnormal range: ``limit`` (default ``None``) is then ``"normal"``, and
``"subnormal"`` (the values that *will* flush to zero) when no loss scale is reported. Overflow with a loss
scale is the scaler's routine (it skips the step and halves the scale; ``loss_scale`` watches it): it is judged
only when ``format`` is set explicitly.

Judged layers: 2-d and larger parameters (``count > units``; every layer when ``units`` is unknown). A bias or a
norm gain is a handful of values, each a sum over the whole batch; their share of tiny values says little.

``max_fraction`` 0.1, measured on the evaluation zoo (``benchmarks/zoo.py``, deep statistics at every step, 5
seeds of each healthy scenario). The healthy fp16-autocast run with a GradScaler (the only one judged by
default) has at most 3.3% of a judged layer's values in fp16's subnormal range once scaled (none below its
smallest subnormal). Judged as plain fp16 (``format = "fp16"``), the other healthy runs have up to 6.7% of a
judged layer's values below the smallest subnormal (the SGD MLP's last layer near convergence). The
``fp16_underflow`` scenario (gradients x1e-6 on an fp32 run, ``format = "fp16"``) reads 100% in every weight.

Two weight matrices under fp16 autocast with a GradScaler at 65536; from step 3 on the gradients are 1e-9
of what they were: even scaled, they fall below fp16's smallest normal:

>>> from gfservice.api import StepStats
>>> from gfservice.stats import GradStats
>>> from gfservice.testing import replay
>>> rng = np.random.default_rng(0)
>>> def step(i, factor):
...     g = {"0.weight": rng.normal(0, 1e-3, (64, 32)), "2.weight": rng.normal(0, 1e-2, (10, 64))}
...     g = {k: v * factor for k, v in g.items()}
...     return StepStats(run="doc", step=i, grads=GradStats.from_arrays(g, deep=True), loss_scale=65536.0)
>>> steps = [step(i, 1.0) for i in range(3)] + [step(i, 1e-9) for i in range(3, 6)]
>>> [(f.step, f.layers, f.key) for f in replay(Precision(), steps)][:1]   # fp16: a loss scale is reported
[(4, ['0.weight', '2.weight'], 'underflow')]
>>> replay(Precision(), steps)[0].message
'100% of the non-zero gradient values of layers 0.weight, 2.weight fall below the smallest normal number in fp16
(scaled by 65536) at 2 deep steps in a row (now step 4); raise the loss scale ...'
>>> replay(Precision(format="bf16"), steps)                 # bf16 reaches down to ~1e-40
[]
>>> Precision().update(StepStats(run="doc", step=9, grads=steps[4].grads)) is None   # no loss scale: silent
True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats, describe_layers
from gfservice.stats import FORMAT_LIMITS, FORMAT_MAX, FP32_BIAS, GradStats

Format = Literal["fp16", "bf16", "fp8_e4m3", "fp8_e5m2"]


def shares(g: GradStats, fmt: str, shift: int = 0, limit: str = "subnormal") -> tuple[np.ndarray, np.ndarray]:
    """Per layer: the share of non-zero finite gradient values that underflow and that overflow ``fmt`` once
    multiplied by ``2**shift`` (deep steps only).

    >>> g = GradStats.from_arrays({"g": np.array([1.0, 1e-5, 1e-9, 1e5, 0.0])}, deep=True)
    >>> [a.round(2).tolist() for a in shares(g, "fp16")]
    [[0.25], [0.25]]
    >>> [a.round(2).tolist() for a in shares(g, "fp16", shift=16)]      # x65536: 1e-9 is now 6.6e-5
    [[0.0], [0.5]]
    """
    assert g.exp_hist is not None and g.zeros is not None
    hist = g.exp_hist[:, :255]  # bin 255 holds Inf and NaN
    nonzero = hist.sum(axis=1) - g.zeros
    low = FORMAT_LIMITS[fmt][1 if limit == "subnormal" else 0]
    # a value with biased fp32 exponent b is in [2**(b-127), 2**(b-126)); times 2**shift it is below 2**low
    # when b < low - shift + 127. Bin 0 holds the zeros and the fp32 subnormals.
    cut = low - shift + FP32_BIAS
    under = (hist[:, : min(cut, 255)].sum(axis=1) - g.zeros) if cut >= 1 else np.zeros(len(hist), np.int64)
    top = math.frexp(FORMAT_MAX[fmt])[1]  # FORMAT_MAX < 2**top: values of at least 2**top overflow
    over = hist[:, max(top - shift + FP32_BIAS, 1):].sum(axis=1)
    den = np.maximum(nonzero, 1)
    return np.where(nonzero > 0, under / den, 0.0), np.where(nonzero > 0, over / den, 0.0)


class Precision(Detector):
    """Precision: a share of a layer's gradient values underflows (or overflows) fp16, bf16 or fp8."""

    name = "precision"

    class Config(DetectorConfig):
        #: The format the gradients pass through; None: fp16 when the run reports a loss scale, else not judged.
        format: Format | None = None
        #: "subnormal": count values that flush to zero; "normal": also those that only lose precision;
        #: None: "normal" when a loss scale is reported (flushed values are zeros by then), else "subnormal".
        limit: Literal["subnormal", "normal"] | None = None
        #: Largest tolerated share of a layer's non-zero gradient values that underflow.
        max_fraction: float = Field(0.1, gt=0, le=1)
        #: Largest tolerated share that would overflow (judged with an explicit ``format`` only).
        max_overflow_fraction: float = Field(0.0, ge=0, lt=1)
        #: Consecutive deep steps a layer must be over a limit before it is reported.
        window: int = Field(2, ge=1)

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._under: np.ndarray | None = None
        self._over: np.ndarray | None = None
        self._layers: tuple[str, ...] = ()
        #: The loss scale reported at the previous step: the one the current step's backward used.
        self._prev_scale: float | None = None
        #: Per layer, the smallest share of exactly-zero gradient values seen at a deep step (its structural zeros).
        self._base_zeros: np.ndarray | None = None

    def update(self, step: StepStats) -> list[Finding] | None:
        scale = step.loss_scale if step.loss_scale is not None and step.loss_scale > 0 else None
        used = self._prev_scale if self._prev_scale is not None else scale
        if used is not None and scale is not None and self._prev_scale is None and step.skipped:
            used = 2 * scale  # the first step seen was skipped: the scaler has halved the scale it used
        self._prev_scale = scale
        g = step.grads
        if g.exp_hist is None or g.zeros is None:
            return None  # not a deep step
        cfg = self.config
        fmt = cfg.format or ("fp16" if scale is not None else None) or step.precision or step.autocast
        if fmt is None:
            return None  # no format configured or read from the run, no loss scale: not judged
        shift = round(math.log2(used)) if used is not None and math.isfinite(used) else 0
        limit = cfg.limit or ("normal" if scale is not None else "subnormal")
        under, over = shares(g, fmt, shift, limit)
        judged = g.count > 0
        if g.units is not None:
            judged &= g.count > g.units
        if cfg.format is None and scale is None and step.precision is not None:
            under = under + self._flushed(g, judged)
        hot_under = judged & (under > cfg.max_fraction)
        hot_over = judged & (over > cfg.max_overflow_fraction) & (cfg.format is not None)
        if self._under is None or self._over is None or self._layers != g.layers:
            self._under = np.zeros(len(g.layers), np.int64)
            self._over = np.zeros(len(g.layers), np.int64)
            self._layers = g.layers
        self._under = np.where(hot_under, self._under + 1, 0)
        self._over = np.where(hot_over, self._over + 1, 0)
        scaled = f" (scaled by {used:g})" if used is not None else ""
        out: list[Finding] = []
        below = "flush to zero" if limit == "subnormal" else "fall below the smallest normal number"
        for key, streak, frac, what, advice, threshold in (
            ("underflow", self._under, under, below,
             "raise the loss scale (torch.amp.GradScaler, init_scale), use per-tensor scaling for fp8, or keep "
             "these gradients in a wider format (bf16 or fp32)", cfg.max_fraction),
            ("overflow", self._over, over, "would overflow",
             "lower the loss scale, clip gradients, or keep these gradients in a wider format",
             cfg.max_overflow_fraction),
        ):
            hit = np.flatnonzero(streak >= cfg.window)
            if hit.size == 0:
                continue
            names = [g.layers[i] for i in hit]
            worst = float(frac[hit].max())
            out.append(self.finding(
                step, "warning",
                f"{worst:.0%} of the non-zero gradient values of {describe_layers(names)} {what} in {fmt}{scaled} "
                f"at {cfg.window} deep steps in a row (now step {step.step}); {advice}",
                layers=names, value=worst, threshold=threshold, key=key))
        return out

    def _flushed(self, g: GradStats, judged: np.ndarray) -> np.ndarray:
        """Gradients held in a low-precision format (``StepStats.precision``) that underflow are zeros by the time
        they are read: per layer, the share of values that are zero beyond the layer's own structural zeros
        (the smallest share seen at a deep step), counted where more than ``max_fraction`` of it went to zero
        in at least half the judged layers (an underflowing loss reaches every layer; a dead ReLU one layer)."""
        assert g.zeros is not None
        frac = np.where(g.count > 0, g.zeros / np.maximum(g.count, 1), np.nan)
        if self._base_zeros is None or len(self._base_zeros) != len(frac):
            self._base_zeros = frac
            return np.zeros(len(frac))
        excess = np.nan_to_num(np.maximum(frac - self._base_zeros, 0.0))
        self._base_zeros = np.fmin(self._base_zeros, frac)
        hot = judged & (excess > self.config.max_fraction)
        if not judged.any() or hot.sum() * 2 < judged.sum():
            return np.zeros(len(frac))
        return excess

    def state_dict(self) -> dict[str, Any]:
        return {"under": self._under, "over": self._over, "layers": list(self._layers),
                "prev_scale": self._prev_scale, "base_zeros": self._base_zeros}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._under = state.get("under")
        self._over = state.get("over")
        self._layers = tuple(state.get("layers", ()))
        s = state.get("prev_scale")
        self._prev_scale = None if s is None else float(s)
        self._base_zeros = state.get("base_zeros")
