"""``exploding``: the gradient norm explodes.

Four checks, each its own finding key; a jump of ``critical_orders`` (3) orders of magnitude or more against its
reference is ``critical``, a smaller one a ``warning``:

- ``spike``: the global gradient norm jumps against its own recent history. Once ``warmup`` steps are in the
  history: a robust (modified) z-score of log(norm) against the median and MAD of the last ``window``
  non-outlier steps (Iglewicz and Hoaglin's modified z-score, 1993; their outlier cut of 3.5 is raised to 6.5 here,
  and the scale is floored at ``min_log_scale`` so that a very steady history does not turn ordinary noise into
  pages: with the floor of 0.5 a jump must be at least e^3, about 20x the recent median, to count. Small-batch
  SGD on a plain 20-layer ReLU MLP shows healthy single-step jumps of 5-20x; a floor of 0.25 flagged 12 of 40
  such runs, 0.5 none, while a learning rate jumped 200x is still caught at the next step, before the NaN, in 30
  of 30 runs). Before that, from the second step on, each step is compared with the largest norm seen so far
  and a norm ``early_ratio`` (100) times above it is a spike: Megatron-core's ``is_unexpectedly_large`` rule
  (a gradient norm 10x the largest of the first 100 seen), made 10x more conservative while the history is
  short (the evaluation zoo's 8 healthy scenarios, 3 seeds each, move at most 2.3x against the largest earlier norm
  in their first ten steps; its ReLU RNN whose gradients blow up 1e4x or more at step 1 is reported, critical,
  at that step, before its NaN at step 2 or 3). Outliers are not added to the history, so a spike does not hide
  the next one.
- ``abs``: the largest |g| reaches ``max_abs`` (65504, the largest finite float16 value: a gradient that could
  not even be represented in half precision; the zoo's healthy runs stay under 0.6). This is what judges the very
  first step, which has no history; critical from ``critical_orders`` above the bound. On CPU the monitor reads
  the maximum on deep steps and wherever a layer's norm reaches 448 (``PEAK_BOUND``; ``max |g| <= ||g||``), so a
  bound of at least 448 misses nothing. A global norm that
  overflowed float64 while every value is finite is reported here too (critical): a huge gradient, not a
  non-finite one.
- ``cap``: the global norm exceeds an absolute ``max_norm`` (off by default: a sensible cap depends on the model;
  set it to a few times the norm you clip at). Critical.
- ``layer``: one layer's RMS grows ``layer_orders`` orders of magnitude relative to the median layer, compared
  with the same ratio's own typical value (layers legitimately differ by orders of magnitude: the output layers of
  a vanishing 20-layer sigmoid network sit 6 orders above its median layer from the first step; a layer that
  *moves* 1000x against the others does not), and ends up at least ``layer_min_orders`` above the median layer
  (a layer far below the others that gets a little gradient back is not an explosion). It judges from the second
  step on; the zoo's healthy layers move at most 0.6 orders against the median layer in their first ten steps.

- ``trend``: slow growth that never looks like a spike. Globally (``drift.UniformRise``, once the run has settled:
  no new high for ``trend_settle`` steps): the level of the global norm (median of ``trend_window`` steps) stands
  ``trend_ratio`` (3) times above its lowest level (median of 20 steps) of the last ``trend_horizon`` (50) steps,
  *and every layer rose alike*: the spread of the layers' rises, weighted by their share of the norm, is at most
  ``trend_uniform`` (0.08) of the global rise. A loss weight that keeps growing, gradients summed without
  ``zero_grad``, a gradient scaled by a bug multiply every layer by one factor (spread/rise 0.00-0.04 in the
  evaluation zoo's ramps); learning changes layers unequally (a tanh RNN leaving its plateau rises 10x in 12
  steps, an SGD LSTM 13x over 75 steps: spread/rise 0.10-0.40), so those are not reported. A rise over which the
  learning rate rose ``trend_lr_ratio`` (1.5) times (a warm-up, an SGDR restart) is explained, and so is one that
  stays below the run's early scale (see below). For one layer (``drift.RampTest``, from the start): its norm
  grows against the rest of the model and on its own, and it carries ``trend_layer_share`` of the gradient (a
  parameter left out of the optimizer whose ``.grad`` is never cleared). One layer compounding, whatever its share
  (``drift.SteadyLayerRise``, with baselines taken once the run has settled): its own norm and its share of the
  norm both stand ``trend_ratio`` times above their lowest levels of the last ``trend_horizon`` steps and rose
  steadily over the last ``trend_steady_span`` (30) steps (least-squares slope t at least ``trend_steady_t_own``
  (5) and ``trend_steady_t_share`` (15)), with no learning-rate rise: the zoo's ``layer_ramp`` (a hook that
  multiplies one layer's gradient by 1.05 a step) reads own t 6.1-7.7 and share t 37-46 at its 3x crossing;
  healthy layers that rise alone (a transformer's final LayerNorm early on, BatchNorm weights under weight decay)
  are not steady in both at once (0 healthy zoo runs at t 3.5 and 10). One finding per rise.

A spike within ``lr_recent`` (5) steps of a learning rate ``lr_jump`` (10) times its median before is the optimizer
diverging (a schedule or code that set the learning rate wrong), not one bad batch: it is ``critical`` whatever its
size, the message names the learning rate's rise (step, factor), and a robust z of ``lr_z_threshold`` (3) is
enough (the architecture sweep's gpt2 and resnet jump 19-23x, z below 6.5, right after a 10x learning rate).
Otherwise the spike rule's z cut is 6.5: a healthy clipped tanh RNN leaving its plateau jumps at z 6.1 (21x) on
its pre-clip norm; every injected explosion of the zoo is at 3 orders or more.

A spike is judged against the run's own scale too: a jump that stays below the median of the first
``scale_steps`` (20) norms is the noise of a run that has all but converged (the zoo's ``converged_noise``: a
38x jump to 0.21 against an early median of ~0.4) and is not reported.

Steps with NaN/Inf gradient values are ``nonfinite``'s and are not judged here (``update`` returns ``None``).

>>> from gfservice.testing import make_step, replay
>>> rng = np.random.default_rng(0)
>>> norms = np.exp(rng.normal(0.0, 0.1, 40))
>>> norms[30] = 50.0                                  # a 50x jump at step 30
>>> norms[35] = 5e3                                   # a 5000x jump at step 35
>>> steps = [make_step(step=i, sum_sq=[n**2 / 2, n**2 / 2]) for i, n in enumerate(norms)]
>>> [(f.step, f.key, f.severity.value) for f in replay(Exploding(), steps)]
[(30, 'spike', 'warning'), (35, 'spike', 'critical')]
>>> early = [make_step(step=0, sum_sq=[1.0, 1.0]), make_step(step=1, sum_sq=[1e9, 1e9])]   # 3e4x at step 1
>>> [(f.step, f.key, f.severity.value) for f in replay(Exploding(), early)]
[(1, 'spike', 'critical')]
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np
from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, Severity, StepStats, describe_layers

from .drift import RampTest, SteadyLayerRise, UniformRise

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this estimates its standard deviation
FP16_MAX = 65504.0


class Exploding(Detector):
    """Exploding gradients: the global norm spikes against its history, passes a bound, or one layer runs away."""

    name = "exploding"

    class Config(DetectorConfig):
        #: Robust z-score of log(global norm) above which a step is a spike (once ``warmup`` steps are known).
        z_threshold: float = Field(6.5, gt=0)
        #: Non-outlier steps of the history.
        window: int = Field(50, ge=2)
        #: Steps in the history before the robust z-score is used (before: the ``early_ratio`` rule).
        warmup: int = Field(10, ge=2)
        #: Floor of the robust scale of log(norm).
        min_log_scale: float = Field(0.5, gt=0)
        #: While the history is shorter than ``warmup``: a norm this many times the largest so far is a spike.
        early_ratio: float = Field(100.0, gt=1)
        #: A jump of this many orders of magnitude against its reference is critical (smaller ones: warning).
        critical_orders: float = Field(3.0, gt=0)
        #: Largest |g| allowed (default: float16's largest value); None turns the check off.
        max_abs: float | None = Field(FP16_MAX, gt=0)
        #: Cap on the global norm (off by default); passing it is critical.
        max_norm: float | None = Field(None, gt=0)
        #: Orders of magnitude a layer must move against the median layer, relative to its usual ratio.
        layer_orders: float = Field(3.0, gt=0)
        #: ...and where it must end up, at least, above the median layer.
        layer_min_orders: float = Field(1.0, ge=0)
        #: The run's own scale: the median of the first ``scale_steps`` global norms. A spike that stays below it
        #: (a tiny norm jumping in a run that has all but converged) is not an explosion; 0 turns this off.
        scale_steps: int = Field(20, ge=0)
        #: ``trend``, global (see ``drift.UniformRise``): the level (median of ``trend_window`` log norms) stands
        #: ``trend_ratio`` times above its lowest level of the last ``trend_horizon`` steps, and every layer rose
        #: alike (spread across layers at most ``trend_uniform`` of the rise), unexplained by a learning rate that
        #: rose ``trend_lr_ratio`` times or more over the same steps.
        trend_window: int = Field(10, ge=2)
        trend_ratio: float = Field(3.0, gt=1)
        trend_horizon: int = Field(50, ge=2)
        trend_uniform: float = Field(0.08, gt=0)
        trend_lr_ratio: float = Field(1.5, gt=1)
        #: The global norm is judged once the run has settled: no new high (by ``trend_half``) for this many steps.
        trend_settle: int = Field(30, ge=0)
        trend_half: float = Field(1.25, gt=1)
        #: ``trend``, one layer (see ``drift.RampTest``): judged against the rest of the model, from the start, once
        #: it carries ``trend_layer_share`` of the sum of squares; the ramp grows ``trend_ratio`` times beyond an
        #: allowance of ``trend_layer_allowance`` (log) per step, in each of ``trend_parts`` parts of
        #: ``trend_span`` steps.
        trend_layer_allowance: float = Field(0.02, ge=0)
        trend_layer_share: float = Field(0.5, gt=0, le=1)
        trend_span: int = Field(7, ge=1)
        trend_parts: int = Field(3, ge=2)
        #: ``trend``, one layer compounding (see ``drift.SteadyLayerRise``), whatever its share: its own norm and
        #: its share of the norm both stand ``trend_ratio`` times above their anchored baselines and rose steadily
        #: over the last ``trend_steady_span`` steps (least-squares slope t-statistic at least
        #: ``trend_steady_t_own`` and ``trend_steady_t_share``), unexplained by a learning-rate rise.
        trend_steady_span: int = Field(30, ge=3)
        trend_steady_t_own: float = Field(5.0, gt=0)
        trend_steady_t_share: float = Field(15.0, gt=0)
        #: A spike within ``lr_recent`` steps of a learning rate ``lr_jump`` times its median over the
        #: ``window`` steps before is the optimizer diverging, not one bad batch: critical, and said so.
        lr_jump: float = Field(10.0, gt=1)
        lr_recent: int = Field(5, ge=1)
        #: ...and the robust z-score a spike needs then (a jump of e^(3 * 0.5), 4.5x, at the scale's floor).
        lr_z_threshold: float = Field(3.0, gt=0)

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._history: deque[float] = deque(maxlen=self.config.window)
        self._layer_baseline: np.ndarray | None = None
        self._early: list[float] = []  # the first scale_steps log norms
        self._uniform = self._uniform_test()
        self._lrs: deque[float] = deque(maxlen=self._lr_span())
        self._ramp_layers: RampTest | None = None
        self._ramp_own: RampTest | None = None
        self._steady: SteadyLayerRise | None = None
        self._high, self._since_high, self._settled = -math.inf, 0, False
        self._trend_open = False
        self._trend_quiet = 0  # steps since a trend test last held (a rise ends after trend_window quiet steps)

    def _severity(self, orders: float) -> Severity:
        return Severity.critical if orders >= self.config.critical_orders else Severity.warning

    def update(self, step: StepStats) -> list[Finding] | None:
        self._lrs.append(_learning_rate(step))
        g = step.grads
        if not len(g.layers) or not (g.count > 0).any():
            return None  # no gradient at all: nothing to judge (no_gradient's)
        if g.nonfinite_layers.any():
            return None  # the nonfinite detector speaks for such steps
        cfg = self.config
        out: list[Finding] = []
        norm = step.global_norm
        # max |g| <= the layer's norm: a step without it (CPU core steps) has every layer's norm below
        # PEAK_BOUND, so no value can reach a bound of at least that (the collector reads it on other steps)
        max_abs = float(g.max_abs.max()) if g.max_abs is not None else float(g.norm.max())
        if not math.isfinite(norm):  # every value finite, yet the sum of squares overflowed float64
            out.append(self.finding(
                step, "critical",
                f"the global gradient norm overflowed even float64 at step {step.step} (every value finite, the "
                f"largest |g| {max_abs:.3g}); lower the learning rate or clip gradients, and check that batch",
                value=max_abs, threshold=cfg.max_abs, key="abs"))
            return out
        spike = self._spike(step, norm)
        trend = self._trend(step, norm)
        if spike is not None:
            out.append(spike)
        elif trend is not None:
            out.append(trend)
        elif cfg.max_abs is not None and g.max_abs is not None and max_abs >= cfg.max_abs:
            orders = math.log10(max_abs / cfg.max_abs)
            out.append(self.finding(
                step, self._severity(orders),
                f"the largest gradient value |g| = {max_abs:.3g} reaches the bound {cfg.max_abs:.3g} at step "
                f"{step.step} (global norm {norm:.3g}); lower the learning rate or clip gradients, and check the "
                "initialisation and the loss scale",
                value=max_abs, threshold=cfg.max_abs, key="abs"))
        if cfg.max_norm is not None and norm > cfg.max_norm:
            out.append(self.finding(
                step, "critical",
                f"global gradient norm {norm:.3g} exceeds the cap {cfg.max_norm:.3g} at step {step.step}; "
                "lower the learning rate or clip gradients",
                value=norm, threshold=cfg.max_norm, key="cap"))
        out.extend(self._layer_check(step))
        return out

    def _spike(self, step: StepStats, norm: float) -> Finding | None:
        """Judge the global norm against its history (robust z-score, or the early ratio while it is short)."""
        if norm <= 0:
            return None
        cfg = self.config
        x = math.log(norm)
        found: Finding | None = None
        if len(self._history) >= cfg.warmup:
            hist = np.fromiter(self._history, dtype=np.float64)
            med = float(np.median(hist))
            scale = max(MAD_TO_SIGMA * float(np.median(np.abs(hist - med))), cfg.min_log_scale)
            z = (x - med) / scale
            # after a learning-rate jump a smaller jump of the gradient is already the optimizer diverging
            cut = cfg.lr_z_threshold if self._lr_rise(step.step) is not None else cfg.z_threshold
            if z > cut and self._below_scale(x):
                return None  # below the run's early scale: noise of a converged run, kept out of the history
            if z > cut:
                found = self._spike_finding(
                    step, x - med,
                    f"global gradient norm jumped to {norm:.3g}, {_times(x - med)} its recent median "
                    f"{math.exp(med):.3g} (robust z {z:.1f}) at step {step.step}",
                    "check the learning rate schedule and that batch; a run that does not clip its gradients "
                    "can bound such steps with clipping", value=z, threshold=cfg.z_threshold)
        elif self._history:
            top = max(self._history)
            if x - top >= math.log(cfg.early_ratio):
                found = self._spike_finding(
                    step, x - top,
                    f"global gradient norm jumped to {norm:.3g}, {_times(x - top)} the largest earlier norm "
                    f"{math.exp(top):.3g} at step {step.step}, early in the run",
                    "lower the learning rate and check the initialisation; a run that does not clip its gradients "
                    "can bound such steps with clipping", value=math.exp(x - top), threshold=cfg.early_ratio)
        if found is None:
            self._history.append(x)
            if len(self._early) < cfg.scale_steps:
                self._early.append(x)
        return found

    def _spike_finding(self, step: StepStats, log_jump: float, what: str, advice: str, value: float,
                       threshold: float) -> Finding:
        """A spike: critical from ``critical_orders``, or when it follows a learning-rate jump (then named)."""
        lr_rise = self._lr_rise(step.step)
        if lr_rise is None:
            return self.finding(step, self._severity(log_jump / math.log(10)), f"{what}; {advice}",
                                value=value, threshold=threshold, key="spike")
        at, factor, lr = lr_rise
        return self.finding(
            step, "critical",
            f"{what}, {step.step - at} step(s) after the learning rate rose {_times(math.log(factor))} (to "
            f"{lr:.3g} at step {at}): the optimizer is diverging; restore the learning rate (check the schedule "
            "and any code that sets it)",
            value=value, threshold=threshold, key="spike")

    def _lr_rise(self, step: int) -> tuple[int, float, float] | None:
        """(step, factor, learning rate) of a learning rate ``lr_jump`` times its earlier median within the last
        ``lr_recent`` steps, or None."""
        cfg = self.config
        lrs = np.fromiter(self._lrs, dtype=np.float64)
        before, recent = lrs[:-cfg.lr_recent], lrs[-cfg.lr_recent:]
        before = before[np.isfinite(before) & (before > 0)]
        if not before.size or not np.isfinite(recent).any():
            return None
        ref = float(np.median(before))
        hit = np.flatnonzero(np.nan_to_num(recent, nan=0.0) >= cfg.lr_jump * ref)
        if not hit.size:
            return None
        i = int(hit[0])
        return step - (len(recent) - 1 - i), float(recent[i] / ref), float(recent[i])

    def _below_scale(self, x: float) -> bool:
        """Whether log norm ``x`` stays below the run's early scale (the median of its first norms)."""
        return len(self._early) >= self.config.scale_steps > 0 and x < float(np.median(self._early))

    def _trend(self, step: StepStats, norm: float) -> Finding | None:
        """Slow growth: a rise of the global norm that every layer shares (``UniformRise``, once the run has
        settled), or one layer growing against the rest of the model (``RampTest``, from the start, once that
        layer carries ``trend_layer_share`` of the gradient)."""
        if norm <= 0:
            return None
        cfg = self.config
        g = step.grads
        sq = np.where(np.isfinite(g.sum_sq) & (g.count > 0), g.sum_sq, 0.0)
        total = float(sq.sum())
        n = len(sq)
        if self._ramp_layers is None or self._ramp_layers.width != n or self._ramp_own is None:
            self._ramp_layers, self._ramp_own = self._ramp(n), self._ramp(n)
        if self._steady is None:
            self._steady = self._steady_test(n)
        x = math.log(norm)
        if not self._settled:  # no new high (by trend_half) for trend_settle steps: the run's warm-up is over
            if x > self._high + math.log(cfg.trend_half) or math.isinf(self._high):
                self._high, self._since_high = x, 0
            else:
                self._since_high += 1
            self._settled = self._since_high >= cfg.trend_settle
            if self._settled:
                self._uniform.reset()
                if self._steady is not None:
                    self._steady.reset()
        with np.errstate(divide="ignore"):
            own = np.where(sq > 0, 0.5 * np.log(sq), np.nan)
        rise = self._uniform.update(x, own) if self._settled else None
        if rise is not None and (self._below_scale(math.log(rise.level)) or self._lr_explains(rise.steps)):
            rise = None  # below the run's early scale (a converged run's tiny norm), or the learning rate rose
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = 0.5 * np.log(sq) - 0.5 * np.log(np.maximum(total - sq, 0.0))
        rel[~np.isfinite(rel)] = np.nan
        # the layer grows against the rest *and* on its own (not a rest that fell away, as when layers freeze)
        lay = self._ramp_layers.update(rel) & self._ramp_own.update(own) & (sq >= cfg.trend_layer_share * total)
        steady = self._steady.update(own, rel)
        if steady.any() and self._lr_explains(cfg.trend_steady_span):
            steady[:] = False  # a warm-up or restart raises layers too, and so does early training
        if rise is None and not lay.any() and not steady.any():
            self._trend_quiet += 1
            if self._trend_quiet >= cfg.trend_window:  # a level near the line flickers: the rise ends once it
                self._trend_open = False              # has been quiet for a whole level window
            return None
        self._trend_quiet = 0
        if self._trend_open:
            return None  # one finding per rise
        self._trend_open = True
        if steady.any() and not lay.any():
            idx = np.flatnonzero(steady)
            names = [g.layers[i] for i in idx]
            worst = int(idx[np.argmax(self._steady.factor[idx])])
            grown = math.log(float(self._steady.factor[worst]))
            what = (f"the gradient of {describe_layers(names)} has risen {_times(grown)} above its lowest level of "
                    f"the last {cfg.trend_horizon} steps, steadily over the last {cfg.trend_steady_span} steps and "
                    f"against the rest of the model (now {sq[worst] / total:.0%} of the gradient norm), at step "
                    f"{step.step}, with no learning-rate rise: a factor that compounds on this layer alone")
            advice = ("check for a term or hook that scales this layer's gradient, a loss term on it that keeps "
                      "growing, and that its gradient is cleared every step")
        elif lay.any():
            idx = np.flatnonzero(lay)
            names = [g.layers[i] for i in idx]
            worst = int(idx[np.argmax(self._ramp_layers.cusum[idx])])
            grown = float(self._ramp_layers.level[worst] - self._ramp_layers.start[worst])
            what = (f"the gradient of {describe_layers(names)} has grown steadily against the rest of the model, "
                    f"{_times(grown)} in {int(self._ramp_layers.age[worst])} steps, and now carries "
                    f"{sq[worst] / total:.0%} of the gradient norm at step {step.step}")
            advice = ("check that the gradients are cleared every step (optimizer.zero_grad() for every parameter, "
                      "including any left out of the optimizer) and for a term that scales this layer's gradient")
        else:
            assert rise is not None
            names, grown = [], math.log(rise.factor)
            what = (f"the global gradient norm has risen {_times(grown)} in {rise.steps} steps (to {rise.level:.3g}, "
                    f"median of {cfg.trend_window} steps) at step {step.step}, alike in every layer (spread "
                    f"{rise.spread:.0%} of the rise), with no learning-rate rise: a common factor on every gradient")
            advice = ("check for a loss weight or scale that keeps growing, gradients summed without "
                      "optimizer.zero_grad(), or code that scales the gradients")
        return self.finding(step, self._severity(grown / math.log(10)), f"{what}; {advice}",
                            layers=names, value=math.exp(grown), threshold=cfg.trend_ratio, key="trend")

    def _lr_explains(self, steps: int) -> bool:
        """Whether the learning rate rose ``trend_lr_ratio`` times over the last ``steps`` steps (and the window
        before them): a schedule's warm-up or restart, which raises every layer's gradient alike."""
        lrs = np.fromiter(self._lrs, dtype=np.float64)[-(steps + self.config.trend_window):]
        lrs = lrs[np.isfinite(lrs) & (lrs > 0)]
        return bool(lrs.size) and float(lrs.max()) > self.config.trend_lr_ratio * float(lrs[0])

    def _uniform_test(self) -> UniformRise:
        cfg = self.config
        return UniformRise(cfg.trend_window, cfg.trend_horizon, cfg.trend_ratio, cfg.trend_uniform)

    def _lr_span(self) -> int:
        cfg = self.config
        return max(cfg.window, cfg.trend_horizon) + cfg.trend_window + cfg.lr_recent

    def _steady_test(self, width: int) -> SteadyLayerRise:
        cfg = self.config
        return SteadyLayerRise(width, cfg.trend_window, cfg.trend_horizon, cfg.trend_ratio, cfg.trend_steady_span,
                               cfg.trend_steady_t_own, cfg.trend_steady_t_share)

    def _ramp(self, width: int) -> RampTest:
        cfg = self.config
        return RampTest(width, cfg.trend_window, cfg.trend_layer_allowance, cfg.trend_ratio, cfg.trend_span,
                        cfg.trend_half, parts=cfg.trend_parts)

    def _layer_check(self, step: StepStats) -> list[Finding]:
        g = step.grads
        rms = g.rms
        live = (g.count > 0) & (rms > 0)
        if live.sum() < 3:
            return []
        log_ratio = np.full(len(rms), np.nan)
        log_ratio[live] = np.log10(rms[live]) - np.log10(np.median(rms[live]))
        cfg = self.config
        base = self._layer_baseline
        if base is not None and base.shape == log_ratio.shape:
            growth = np.nan_to_num(log_ratio - base, nan=-np.inf)
            hot = np.flatnonzero((growth > cfg.layer_orders)
                                 & (np.nan_to_num(log_ratio, nan=-np.inf) >= cfg.layer_min_orders))
            if hot.size:
                names = [g.layers[i] for i in hot]
                worst = float(np.max(growth[hot]))
                return [self.finding(
                    step, self._severity(worst),
                    f"{describe_layers(names)} grew {worst:.1f} orders of magnitude against the median layer "
                    f"at step {step.step}; inspect those layers' inputs and initialisation, or clip gradients",
                    layers=names, value=worst, threshold=cfg.layer_orders, key="layer")]  # baseline kept clean
        # Running baseline: exponential average of the log ratio, per layer.
        if base is None or base.shape != log_ratio.shape:
            self._layer_baseline = log_ratio
        else:
            alpha = 0.1
            self._layer_baseline = np.where(
                np.isnan(base), log_ratio, np.where(np.isnan(log_ratio), base, (1 - alpha) * base + alpha * log_ratio)
            )
        return []

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": list(self._history),
            "layer_baseline": self._layer_baseline,
            "early": list(self._early),
            "uniform": self._uniform.state_dict(),
            "lrs": list(self._lrs),
            "ramp_layers": None if self._ramp_layers is None else self._ramp_layers.state_dict(),
            "ramp_own": None if self._ramp_own is None else self._ramp_own.state_dict(),
            "steady": None if self._steady is None else self._steady.state_dict(),
            "settle": (self._high, self._since_high, self._settled),
            "trend_open": self._trend_open,
            "trend_quiet": self._trend_quiet,
        }

    def load_state_dict(self, state: Any) -> None:
        self._history = deque(state.get("history", []), maxlen=self.config.window)
        self._layer_baseline = state.get("layer_baseline")
        self._early = list(state.get("early", []))
        self._uniform = self._uniform_test()
        self._uniform.load_state_dict(state.get("uniform") or {})
        self._lrs = deque(state.get("lrs", []), maxlen=self._lr_span())
        layers, own = state.get("ramp_layers"), state.get("ramp_own")
        self._ramp_layers = self._ramp_own = None
        if layers and own and layers.get("cusum") is not None and own.get("cusum") is not None:
            self._ramp_layers, self._ramp_own = self._ramp(len(layers["cusum"])), self._ramp(len(own["cusum"]))
            self._ramp_layers.load_state_dict(layers)
            self._ramp_own.load_state_dict(own)
        steady = state.get("steady")
        self._steady = None
        if steady:
            self._steady = self._steady_test(int(steady.get("width", 0)))
            self._steady.load_state_dict(steady)
        self._high, self._since_high, self._settled = state.get("settle", (-math.inf, 0, False))
        self._trend_open = bool(state.get("trend_open", False))
        self._trend_quiet = int(state.get("trend_quiet", 0))


def _learning_rate(step: StepStats) -> float:
    """The step's largest learning rate over its parameter groups (``lr`` where no group says), or NaN."""
    values = [] if step.group_lr is None else [float(v) for v in np.asarray(step.group_lr, dtype=np.float64)]
    if step.lr is not None:
        values.append(float(step.lr))
    values = [v for v in values if math.isfinite(v)]
    return max(values) if values else math.nan


def _times(log_ratio: float) -> str:
    """``e**log_ratio`` as a factor: '98.8x', '1.2e+20x'."""
    r = math.exp(min(log_ratio, 700.0))
    return f"{r:.1f}x" if r < 1e4 else f"{r:.1e}x"
