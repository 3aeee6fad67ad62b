"""``update_ratio``: the optimizer's steps are far too large (or zero) for the weights they change.

The update-to-weight ratio ``|w_after - w_before| / |w_after|`` of a layer (``StepStats.update_ratio``, on deep
steps that saw the optimizer step) says how much of the layer one step rewrites. The folk rule for healthy
SGD and Adam training is about 1e-3 per step. Two checks, each its own finding key, both naming the layers:

- ``high``: a weight matrix's ratio is above ``high`` (default 0.2) at ``window`` consecutive deep steps
  (default 1). The learning rate is too high for these layers: lower it, or warm it up. One deep step is
  enough by default because the signal does not last: Adam's updates are about ``lr`` per element from the
  first step on, so a learning rate that is a sizeable fraction of the weights' RMS rewrites them at once, the
  weights then grow until the ratio looks ordinary (AdamW at lr 0.08 on the digits MLP: 0.85 at step 0, 0.3 at
  step 3, 0.09 at step 10, 0.05 at step 20), and the damage is done. A step that rewrites 20% of a layer's
  weights is worth a look even when it is a one-off (a gradient spike under SGD).
- ``low``: a layer with a non-zero gradient has a ratio below ``low`` at ``low_window`` consecutive deep steps
  (default 3) while the median judged layer's ratio is at least ``learning`` (the others learn): the optimizer
  does not move it (not in the optimizer's parameter groups, a learning rate of 0 in its group, weights kept in
  too low a precision to register the updates). SageMaker Debugger's ``WeightUpdateRatio`` rule uses 1e-8 as
  its small threshold (and 10 as its large one, which only a run about to diverge reaches).
- ``stuck``: *every* judged weight matrix's ratio is below ``stuck`` (default 1e-6) at ``stuck_window`` deep steps
  in a row (default 2) while the learning rate is known, above 0 and at its level (not warming up, not annealed
  below ``annealed`` of its peak): nothing moves, which ``low`` cannot see (it needs other layers to learn). The
  finding names the learning rate with its value (the largest of the optimizer's parameter groups,
  ``StepStats.group_lr``, else ``StepStats.lr``).
- ``decay``: a layer whose parameter group's ``lr * weight_decay`` (the share of the weights decay removes per
  step, ``StepStats.group_lr``/``group_wd``/``layer_group``) is at least ``max_decay`` (default 0.01) and whose
  weight norm fell since the previous deep step, at ``decay_window`` deep steps in a row (default 2): weight
  decay collapses the weights. The finding names weight decay and its value; ``high`` judges only what decay
  does not explain (``ratio - lr * weight_decay``), so such a run is not blamed on the learning rate.

``stuck`` 1e-6 and ``max_decay`` 0.01, measured on the zoo (deep statistics every 10 steps, seed 0): the
largest ratio of any judged matrix is at most 1.2e-7 in ``lr_too_low`` (SGD 1e-7) and the median 4e-9 in
``lr_too_low_adam`` (AdamW 1e-9); the smallest median ratio of a healthy run with its learning rate at its level
is 1e-5 (``slow_sgd``, SGD 2e-4, which still learns), and 1.4e-5 at the end of the transformer's cosine schedule.
Healthy ``lr * weight_decay`` is 1e-3 at most (``adamw_strong_wd``: AdamW 1e-3 with decay 1.0;
``bn_weight_decay``: SGD 0.1 with 1e-2), typical AdamW 1e-4; ``wd_collapse`` (AdamW, decay 100) reads 0.1,
``wd_collapse_sgd`` (SGD 0.05, decay 1) 0.05.

Judged: layers with a gradient at this step and weights of RMS at least ``min_weight_rms``. ``high`` judges
2-d and larger parameters only (``count > units``; every layer when ``units`` is unknown), and of those only
the ones whose weight RMS is at least ``min_weight_share`` of the median matrix's: 1-d parameters (biases, norm
gains) and zero- or small-initialised matrices (LoRA's B, zero-initialised output projections) start at or near
0, so their first updates are most of their weight. Steps the GradScaler skipped (no update) and steps without
update statistics are not judged (``None``).

``high`` = 0.2 is measured on the evaluation zoo (``benchmarks/zoo.py``, update statistics at every step, 5
seeds of each healthy scenario: digits MLP with SGD and momentum, conv-BN, LSTM with Adam 3e-3, pre-LN
transformer with AdamW warm-up, residual MLP with Adam, fine-tuning, bf16 and fp16 autocast): the largest ratio
of any judged matrix at any step is 0.08 (the fine-tuning run's new head, steps 3-6), and Adam's first step
(``lr * sqrt(n) / |w|``) reads 0.03 at most. The ``update_ratio`` scenario (AdamW lr 0.08 on the digits MLP)
reads 0.85-0.87 at step 0, the post-LN transformer at AdamW 5e-2 without warm-up (``postln_no_warmup``)
0.57-0.58. Healthy ratios fall to ~1e-8 only where the whole run's learning rate does (the end of the cosine
schedule), which ``learning`` (1e-5) excludes.

>>> from gfservice.testing import make_step, replay
>>> def step(i, ratios):
...     return make_step(step=i, sum_sq=[1.0] * 3, count=[8192, 128, 1280], units=[128, 128, 10],
...                      layers=["0.weight", "0.bias", "2.weight"], weight_norm=[4.0, 0.1, 1.0],
...                      update_ratio=ratios)
>>> steps = [step(i, [1e-3, 1e-2, 1e-3]) for i in range(3)] + [step(i, [0.5, 0.9, 0.4]) for i in range(3, 6)]
>>> [(f.step, f.key, f.layers) for f in replay(UpdateRatio(), steps)][:1]   # too high from step 3
[(3, 'high', ['0.weight', '2.weight'])]
>>> replay(UpdateRatio(), steps)[0].message
'each optimizer step rewrites up to 50% of the weights of layers 0.weight, 2.weight (update-to-weight ratio ...'
>>> steps = [step(i, [1e-3, 1e-3, 0.0]) for i in range(4)]                 # 2.weight is never updated
>>> [(f.step, f.key, f.layers) for f in replay(UpdateRatio(), steps)]
[(2, 'low', ['2.weight']), (3, 'low', ['2.weight'])]
>>> UpdateRatio().update(make_step(sum_sq=[1.0])) is None                  # no update statistics: not judged
True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats, describe_layers


class UpdateRatio(Detector):
    """Update-to-weight ratio: layers whose optimizer steps rewrite the weights (LR too high), or never move them."""

    name = "update_ratio"

    class Config(DetectorConfig):
        #: A weight matrix whose ratio is above this at ``window`` deep steps in a row is reported.
        high: float = Field(0.2, gt=0)
        window: int = Field(1, ge=1)
        #: A layer whose ratio is below this at ``low_window`` deep steps in a row, while others learn (SageMaker).
        low: float = Field(1e-8, ge=0)
        low_window: int = Field(3, ge=1)
        #: The median judged layer's ratio must be at least this for ``low`` (the rest of the model learns).
        learning: float = Field(1e-5, gt=0)
        #: Layers whose weights' RMS is below this are not judged (zero-initialised biases and matrices).
        min_weight_rms: float = Field(1e-6, ge=0)
        #: ``high`` skips matrices whose weight RMS is below this share of the median matrix's (small-initialised).
        min_weight_share: float = Field(0.1, ge=0, lt=1)
        #: ``high`` skips matrices with fewer elements than this: the ratio of a handful of weights is noise (a
        #: 4-input linear layer under SGD at lr 0.1 moves 20% at its first step and trains fine).
        min_numel: int = Field(256, ge=1)
        #: Every judged weight matrix below this ratio at ``stuck_window`` deep steps in a row: nothing moves, the
        #: learning rate is too low (see the module docstring for the measurement).
        stuck: float = Field(1e-6, ge=0)
        stuck_window: int = Field(2, ge=1)
        #: ``stuck`` is not judged while the learning rate is below this share of its peak so far (a schedule
        #: that annealed it) or rising (a warm-up).
        annealed: float = Field(0.1, ge=0, le=1)
        #: A layer whose parameter group's ``lr * weight_decay`` (the share of the weights decay removes per
        #: step) is at least this, and whose weights shrank since the previous deep step, at ``decay_window``
        #: deep steps in a row: weight decay collapses the weights.
        max_decay: float = Field(0.01, gt=0)
        decay_window: int = Field(2, ge=1)

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._high: np.ndarray | None = None
        self._low: np.ndarray | None = None
        self._layers: tuple[str, ...] = ()
        self._stuck = 0
        self._peak_lr = 0.0
        self._prev_lr: float | None = None
        self._decay: np.ndarray | None = None
        self._prev_weight: np.ndarray | None = None

    def update(self, step: StepStats) -> list[Finding] | None:
        g = step.grads
        ratio = g.update_ratio
        if ratio is None or g.weight_sq is None or step.skipped:
            return None  # no optimizer step seen at this step (or the GradScaler skipped it)
        cfg = self.config
        with np.errstate(invalid="ignore", divide="ignore"):
            weight_rms = np.sqrt(g.weight_sq / np.maximum(g.count, 1))
        judged = (g.count > 0) & np.isfinite(ratio) & (weight_rms >= cfg.min_weight_rms)
        matrix = judged if g.units is None else judged & (g.count > g.units)
        twod = matrix.copy()  # ``low`` judges matrices only: biases in front of a norm layer get ~no gradient
        matrix &= g.count >= cfg.min_numel
        if matrix.any():
            matrix &= weight_rms >= cfg.min_weight_share * float(np.median(weight_rms[matrix]))
        if self._high is None or self._low is None or self._decay is None or self._layers != g.layers:
            self._high = np.zeros(len(g.layers), np.int64)
            self._low = np.zeros(len(g.layers), np.int64)
            self._decay = np.zeros(len(g.layers), np.int64)
            self._prev_weight = None
            self._layers = g.layers
        decay = _decay_share(step)
        weight = g.weight_norm
        shrinking = (weight < self._prev_weight if self._prev_weight is not None and weight is not None
                     else np.zeros(len(g.layers), bool))
        self._prev_weight = weight
        self._decay = np.where(judged & (decay >= cfg.max_decay) & shrinking, self._decay + 1, 0)
        # what weight decay removes is not blamed on the learning rate: the rest of the update must be too high
        high = matrix & (ratio - decay > cfg.high)
        median = float(np.median(ratio[judged])) if judged.any() else 0.0
        low = twod & (g.sum_sq > 0) & (ratio < cfg.low) & (median >= cfg.learning)
        self._high = np.where(high, self._high + 1, 0)
        self._low = np.where(low, self._low + 1, 0)
        out: list[Finding] = []
        hit = np.flatnonzero(self._high >= cfg.window)
        if hit.size:
            names = [g.layers[i] for i in hit]
            worst = float(ratio[hit].max())
            lr = f" (learning rate {step.lr:.3g})" if step.lr is not None else ""
            runs = f" at {cfg.window} deep steps in a row" if cfg.window > 1 else ""
            out.append(self.finding(
                step, "warning",
                f"each optimizer step rewrites up to {worst:.0%} of the weights of {describe_layers(names)} "
                f"(update-to-weight ratio above {cfg.high:g}{runs}; healthy training is near 1e-3) at step "
                f"{step.step}{lr}: the learning rate is too high for these layers; lower it or "
                "add a warm-up",
                layers=names, value=worst, threshold=cfg.high, key="high"))
        hit = np.flatnonzero(self._low >= cfg.low_window)
        if hit.size:
            # a bias left out with its weight is named with it (biases are not judged alone: see above)
            stuck = {g.layers[i] for i in hit}
            index = {n: i for i, n in enumerate(g.layers)}
            for n in list(stuck):
                j = index.get(n.removesuffix("weight") + "bias") if n.endswith("weight") else None
                if j is not None and judged[j] and ratio[j] < cfg.low:
                    stuck.add(g.layers[j])
            hit = np.array(sorted(index[n] for n in stuck))
            names = [g.layers[i] for i in hit]
            worst = float(ratio[hit].max())
            out.append(self.finding(
                step, "warning",
                f"{describe_layers(names)} get gradients but their weights do not move (update-to-weight ratio "
                f"{worst:.1e}, below {cfg.low:g}, at {cfg.low_window} deep steps in a row, while the median layer's "
                f"is {median:.1e}) at step {step.step}: check that they are in the optimizer's parameter groups "
                "with a non-zero learning rate, and that their weights are not in too low a precision (bf16) to "
                "register the updates",
                layers=names, value=worst, threshold=cfg.low, key="low"))
        out += self._decayed(step, decay)
        out += self._stuck_run(step, ratio, twod & (g.sum_sq > 0))
        return out

    def _decayed(self, step: StepStats, decay: np.ndarray) -> list[Finding]:
        """``decay``: weight decay shrinks the weights of layers step after step (see ``max_decay``)."""
        assert self._decay is not None
        cfg = self.config
        hit = np.flatnonzero(self._decay >= cfg.decay_window)
        if not hit.size:
            return []
        g = step.grads
        names = [g.layers[i] for i in hit]
        worst = float(decay[hit].max())
        i = int(hit[np.argmax(decay[hit])])
        lr, wd = step.per_layer(step.group_lr), step.per_layer(step.group_wd)
        assert lr is not None and wd is not None  # decay is 0 without them
        return [self.finding(
            step, "warning",
            f"weight decay {wd[i]:.3g} at learning rate {lr[i]:.3g} removes {worst:.0%} of the weights of "
            f"{describe_layers(names)} every optimizer step (lr * weight_decay above {cfg.max_decay:g}), and their "
            f"weights shrank at {cfg.decay_window} deep steps in a row (now step {step.step}): the weights "
            "collapse; lower the weight decay (AdamW multiplies the weights by 1 - lr * weight_decay each step)",
            layers=names, value=worst, threshold=cfg.max_decay, key="decay")]

    def _stuck_run(self, step: StepStats, ratio: np.ndarray, judged: np.ndarray) -> list[Finding]:
        """``stuck``: no judged weight matrix moves (every ratio below ``stuck``) while the learning rate is at
        its level (not annealed by a schedule, not warming up): the learning rate is too low."""
        cfg = self.config
        lr = _learning_rate(step)
        warming = lr is not None and self._prev_lr is not None and lr > self._prev_lr
        if lr is not None:
            self._peak_lr = max(self._peak_lr, lr)
            self._prev_lr = lr
        # without a learning rate (or at 0) a still run says nothing: the end of a schedule, or a freeze
        level = lr is not None and lr > 0 and lr >= cfg.annealed * self._peak_lr and not warming
        stuck = level and bool(judged.any()) and float(ratio[judged].max()) < cfg.stuck
        self._stuck = self._stuck + 1 if stuck else 0
        if self._stuck < cfg.stuck_window:
            return []
        g = step.grads
        worst = float(ratio[judged].max())
        what = f"the learning rate ({lr:.3g})"
        return [self.finding(
            step, "warning",
            f"{what} is too low: no layer's weights move (every weight matrix's update-to-weight ratio is below "
            f"{cfg.stuck:g}, at most {worst:.1e}, at {cfg.stuck_window} deep steps in a row; healthy training is "
            f"near 1e-3) at step {step.step}: raise the learning rate (or check the schedule and the optimizer's "
            "parameter groups)",
            layers=[g.layers[i] for i in np.flatnonzero(judged)], value=worst, threshold=cfg.stuck, key="stuck")]

    def state_dict(self) -> dict[str, Any]:
        return {"high": self._high, "low": self._low, "layers": list(self._layers), "stuck": self._stuck,
                "peak_lr": self._peak_lr, "prev_lr": self._prev_lr, "decay": self._decay,
                "prev_weight": self._prev_weight}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._high = state.get("high")
        self._low = state.get("low")
        self._layers = tuple(state.get("layers", ()))
        self._stuck = int(state.get("stuck", 0))
        self._peak_lr = float(state.get("peak_lr", 0.0))
        prev = state.get("prev_lr")
        self._prev_lr = None if prev is None else float(prev)
        self._decay = state.get("decay")
        self._prev_weight = state.get("prev_weight")


def _learning_rate(step: StepStats) -> float | None:
    """The run's largest learning rate at this step: over its parameter groups where sent, else ``lr``."""
    if step.group_lr is not None and len(step.group_lr):
        return float(np.max(step.group_lr))
    return step.lr


def _decay_share(step: StepStats) -> np.ndarray:
    """Per layer, the share of its weights that weight decay removes per step, ``lr * weight_decay`` of its
    parameter group (0 where not known)."""
    lr, wd = step.per_layer(step.group_lr), step.per_layer(step.group_wd)
    if lr is None or wd is None:
        return np.zeros(len(step.layers))
    return np.nan_to_num(lr * wd)
