"""``loss_spike``: the training loss jumps against its own recent history.

A loss spike is often the first sign of an instability (a bad batch, an LR too high for the current
curvature, attention logits blowing up) and can come with a gradient norm that does *not* move: a
normalisation layer absorbs the scale of what comes into it, so ``exploding`` sees nothing. Each finite loss
is compared, on the log scale, with the recent finite losses:

- the *level* is the median of the last ``center`` of them (a short window, so that a loss that is still
  falling is compared with where it is now, not with where it was);
- the *noise* is the step-to-step scatter, ``1.4826 * median(|diff|) / sqrt(2)`` of the successive differences
  of the last ``window`` (robust, and blind to a slow trend, which a plain MAD or standard deviation of a
  falling loss counts as noise);
- the *excursions* are the steps' own jumps above their level (log loss minus level) over the last
  ``excursion_window`` steps.

A step is spiky when ``z = (log loss - level) / noise`` is above ``z_threshold``, the loss is at least
``min_ratio`` times the level, and its jump is at least ``excursion_ratio`` times the second largest of the
recent excursions (a run with heavy-tailed losses has had sizeable jumps all along, a spike is new; the second
largest, so that one earlier spike does not hide the next). That comparison vouches for a jump only once it
has watched ``min_excursions`` steps of excursions (default: a full ``excursion_window``; counted by step number,
so that reports dropped under load do not delay it). A *blow-up*, a step that
lifts the loss by ``blowup_rise`` times the run's starting level or more (back above where the run started),
is spiky without it, before the window is full and in a run whose heavy tail makes the excursion test blind.
``consecutive`` spiky steps in a row raise a warning (default 1: at the step itself). When the gradients of
the spiky step or of the next one are non-finite, the spike is the start of a divergence: a critical finding
(key ``diverged``). Nothing is judged before ``min_history`` finite losses have been seen; NaN/Inf losses are
``nonfinite``'s job and are skipped, and so are losses of 0 or below (no log scale). Every finite loss joins
the level and the noise (medians ignore the odd spike; a lasting change of level becomes the new level after
``center / 2`` steps); spiky steps do not join the excursions, so that a second spike is caught as well.

Sources and measurements. OLMo-core's loss-spike monitor flags a loss above the mean plus 6 standard
deviations of the last 128 steps (``z_threshold`` 6 here); Megatron calls a loss 10x the largest seen
"spiky", too lax for a spike that a LayerNorm absorbs. Neither survives the evaluation zoo
(``benchmarks/zoo.py``; every step of 5 to 15 seeds of each of its 8 healthy scenarios, 86 runs: digits MLP
with SGD, conv-BN, LSTM, pre-LN transformer with warm-up, residual MLP with LayerNorm, fine-tuning with an LR
drop, bf16 and fp16 autocast). A classification loss near convergence is heavy-tailed (one misclassified
sample in a batch of 64 at a median loss of 0.005 reads 35x the median; conv-BN on digits has a one-off 2.7x
batch at z 7.5), and a loss that is still falling inflates a MAD or standard deviation over 128 steps, which
hides the ``loss_spike_ln`` scenario (regression through a LayerNorm, one batch with targets x1.3: loss x3,
gradient norm down; z 1.3-1.8 against the median and MAD of the last 128 log losses). With these statistics:
healthy runs reach z 7.5 at most, once in 120 runs (a 2.7x batch of conv-BN that jumps 2.2x as far as the
second largest of its recent excursions; no other healthy step reaches z 6), while the 13 ``loss_spike_ln``
runs measured (15 seeds but two) read z 8.3-16.6 and jump 4.8x as far or more (a variant on random inputs
instead of digits, in the tests: z 10.8, 4.5x). ``excursion_ratio`` 3 sits between; all 13 are reported at the
spiky step itself.

Heavy tails near convergence (``converged_heavy_tail``: Student-t label noise of 2 degrees of freedom, so the
minibatch loss has no finite variance). A sample with a huge label lifts the loss of every batch that draws it
8-27x above a converged level, irregularly (every ~30 steps). While the loss still falls, the level (a median
of 32 steps) lags it, the run's excursions are negative, and the first outliers after convergence read as
new: warnings on 13 of 20 seeds, at steps 51-143, after 31-123 steps of excursions, with rises of 0.02-0.75x
the starting level. After a full window (128 steps) no seed warns again. The spikes to keep come after a full
window (``loss_spike_ln``, 10 seeds: 130 steps at step 150, rises 0.14-0.19x the start; a thin margin on both
sides) or are blow-ups: ``converged_noise`` (13 seeds) rises 0.83-1.27x the start, ``heavy_tail_noise`` (the
heavy-tailed run with one batch of noisy targets, whose excursion test is blind: its own outliers jump e^2-e^4.7)
5-8x, ``clip_loss_1e6`` 35,000x; no healthy zoo step with z above 6 rises more than 0.76x (a GAN, and this run).
The cost: a one-batch spike smaller than the starting loss in the first ~150 steps is not reported.

>>> import numpy as np
>>> from gfservice.testing import make_step, replay
>>> rng = np.random.default_rng(0)
>>> losses = 0.5 * np.exp(rng.normal(0.0, 0.05, 60))
>>> losses[40] *= 3.0                                   # a 3x jump at step 40
>>> steps = [make_step(step=i, sum_sq=[1.0], loss=float(v)) for i, v in enumerate(losses)]
>>> [(f.step, f.key, f.severity.value) for f in replay(LossSpike(), steps)]
[(40, 'spike', 'warning')]
>>> steps[41] = make_step(step=41, sum_sq=[float("nan")], nonfinite=[5], loss=float("nan"))
>>> [(f.step, f.key, f.severity.value) for f in replay(LossSpike(), steps)]
[(40, 'spike', 'warning'), (41, 'diverged', 'critical')]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats

MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this estimates its standard deviation


class LossSpike(Detector):
    """Loss spike: the loss jumps far above its recent level (robust z-score of log loss), or precedes a NaN."""

    name = "loss_spike"

    class Config(DetectorConfig):
        #: Robust z-score of log(loss) above which a step is spiky (OLMo-core: 6 sigma).
        z_threshold: float = Field(6.0, gt=0)
        #: ...and the loss must be at least this many times the recent level...
        min_ratio: float = Field(1.5, ge=1)
        #: ...and its jump (log) this many times the second largest jump of the last ``excursion_window`` steps.
        excursion_ratio: float = Field(3.0, ge=1)
        excursion_window: int = Field(128, ge=2)
        #: Finite losses whose successive differences give the noise.
        window: int = Field(48, ge=8)
        #: The last this many finite losses give the level (their median).
        center: int = Field(32, ge=1)
        #: Finite losses seen before anything is judged.
        min_history: int = Field(20, ge=5)
        #: Spiky steps in a row that raise the warning.
        consecutive: int = Field(1, ge=1)
        #: ...and the loss must rise by at least this share of the run's starting level (the median of its first
        #: ``min_history`` losses): a converged loss near 0 wobbles by large factors on the log scale, by nothing
        #: that matters (full-batch regression at 1e-6 of its starting loss doubles on rounding noise).
        min_rise: float = Field(0.01, ge=0)
        #: Steps of excursions watched (by step number) before the excursion test may vouch that a jump is new...
        min_excursions: int = Field(128, ge=0)
        #: ...while a rise of the loss by this many times the run's starting level is a spike without it.
        blowup_rise: float = Field(1.0, ge=0)

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._history: deque[float] = deque(maxlen=max(self.config.window, self.config.center, self.config.min_history))
        #: Jumps above the level (log) of the recent steps that were not spiky.
        self._excursions: deque[float] = deque(maxlen=self.config.excursion_window)
        self._streak = 0
        #: Step of the last spike (a non-finite gradient at it or right after it is a divergence).
        self._spike_step: int | None = None
        #: The run's starting loss level (median of its first ``min_history`` finite losses).
        self._start: float | None = None
        #: Step of the first excursion.
        self._first: int | None = None

    def update(self, step: StepStats) -> list[Finding] | None:
        loss = step.loss
        if loss is None:
            return None  # the loss is not reported: not judged
        cfg = self.config
        g = step.grads
        grads_bad = bool(np.any(g.nonfinite > 0) or not np.all(np.isfinite(g.sum_sq)))
        out: list[Finding] = []
        if math.isfinite(loss) and loss > 0:
            x = math.log(loss)
            z, jump, usual = self._score(x)
            ratio = math.exp(jump)
            rise = loss - loss / ratio if ratio > 0 else 0.0  # the loss minus its recent level
            start = self._start
            watched = step.step - self._first if self._first is not None else 0
            vouched = (watched >= min(cfg.min_excursions, cfg.excursion_window)
                       and jump >= cfg.excursion_ratio * max(usual, 0.0)
                       and (start is None or rise >= cfg.min_rise * start))
            blowup = start is not None and rise >= cfg.blowup_rise * start
            spiky = z > cfg.z_threshold and ratio >= cfg.min_ratio and (vouched or blowup)
            self._streak = self._streak + 1 if spiky else 0
            if len(self._history) >= cfg.min_history and not spiky:
                self._excursions.append(jump)
                if self._first is None:
                    self._first = step.step
            self._history.append(x)
            if self._start is None and len(self._history) >= cfg.min_history:
                self._start = math.exp(float(np.median(np.fromiter(self._history, dtype=np.float64))))
            if spiky:
                self._spike_step = step.step
            if self._streak >= cfg.consecutive:
                runs = f" for {self._streak} steps in a row" if cfg.consecutive > 1 else ""
                out.append(self.finding(
                    step, "warning",
                    f"the loss jumped to {loss:.4g}, {ratio:.3g}x its recent level (robust z {z:.1f} on the log "
                    f"scale){runs} at step {step.step}; check that batch (data, labels), the learning rate "
                    "schedule and the gradient norm of these steps",
                    value=z, threshold=cfg.z_threshold, key="spike"))
        else:
            self._streak = 0  # NaN/Inf (nonfinite's job) or a loss <= 0 (no log scale): not compared
        spike = self._spike_step
        if grads_bad and spike is not None and 0 <= step.step - spike <= 1:
            out.append(self.finding(
                step, "critical",
                f"the loss spike at step {spike} was followed by non-finite gradients at step {step.step}: "
                "the run is diverging; restart from the last good checkpoint with a lower learning rate, or skip "
                "that batch",
                value=step.step - spike, threshold=1, key="diverged"))
        return out

    def _score(self, x: float) -> tuple[float, float, float]:
        """Robust z-score of ``x`` against the history, its jump above the level (log) and the second largest
        recent jump; (0, 0, 0) until the history is long enough."""
        cfg = self.config
        if len(self._history) < max(cfg.min_history, 3):
            return 0.0, 0.0, 0.0
        hist = np.fromiter(self._history, dtype=np.float64)
        level = float(np.median(hist[-cfg.center:]))
        noise = MAD_TO_SIGMA * float(np.median(np.abs(np.diff(hist[-cfg.window:])))) / math.sqrt(2)
        jump = x - level
        usual = sorted(self._excursions)[-2] if len(self._excursions) >= 2 else 0.0
        if noise <= 0:
            return (math.inf if jump > 0 else 0.0), jump, usual
        return jump / noise, jump, usual

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self._history), "excursions": list(self._excursions), "streak": self._streak,
                "spike_step": self._spike_step, "start": self._start, "first": self._first}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history = deque((float(v) for v in state.get("history", [])),
                              maxlen=max(self.config.window, self.config.center, self.config.min_history))
        self._excursions = deque((float(v) for v in state.get("excursions", [])),
                                 maxlen=self.config.excursion_window)
        self._streak = int(state.get("streak", 0))
        s = state.get("spike_step")
        self._spike_step = None if s is None else int(s)
        start = state.get("start")
        self._start = None if start is None else float(start)
        first = state.get("first")
        self._first = None if first is None else int(first)
