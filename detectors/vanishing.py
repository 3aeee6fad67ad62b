"""``vanishing``: gradients that have all but disappeared from part of the network, persistently, with depth.

A layer is *vanishing* at a step when it falls behind *comparable layers closer to the output*: some layer of its
role (the same parameter name with the block indices taken out: ``encoder.layer.#.attention.self.query.weight``,
``#.weight`` in an ``nn.Sequential``) later in parameter order carries ``orders`` orders of magnitude more, the
depth profile of a gradient that shrinks on its way back; and either

- its gradient RMS is more than ``orders`` orders of magnitude below the reference layer RMS. The reference is
  the median layer of the step, or the median layer of the first ``window`` judged steps when that is lower: a
  majority of exploding layers cannot drag it up, and a healthy layer downstream of exploding ones (the head of
  an RNN whose recurrent weights blow up) has nothing larger after it, so it is never taken for vanishing: a
  layer far *above* the others is an explosion of that layer (``exploding``'s);
- or its mean |g| is below ``floor`` (on deep steps; the RMS, an upper bound of mean |g|, otherwise). The
  default floor of 1e-7 is the threshold of SageMaker Debugger's built-in ``VanishingGradient`` rule. When the
  median layer is under the floor too, every layer under it is reported, depth profile or not: the whole
  gradient is tiny (a loss scaled down, or training over).

Real architectures hold parameters whose gradients are tiny at initialisation or by construction and are
healthy; none of them has the depth profile, so none is vanishing:

- the query and key projections of attention at initialisation (their gradient is a product of two small
  weight matrices: 1e-6 of the median layer in a post-LN BERT, down to 1e-14 in wav2vec2), alike in every
  block; the parameters of a branch behind a zero-initialised projection or a LayerScale, alike in every block;
- a parameter that gets (almost) no gradient by construction: a 1-d parameter (a bias) ``orders`` orders below
  a parameter of its own module at least as large (its weight) while that one is not vanishing. The bias of a
  convolution or linear layer placed before a BatchNorm/LayerNorm is removed by the normalisation, so its
  gradient is round-off (1e-6 of the median layer in the zoo's conv->BN->ReLU network, every seed); so is the
  key bias of attention under the softmax, and the bias of a BatchNorm whose output reaches the loss only
  through later BatchNorms (the projections of MobileNetV2 and EfficientNet: 1e-8). A real vanishing gradient
  takes the weight down with its bias;
- layers without comparable layers (an embedding, a position embedding, a relative-attention table, a head);
- layers whose gradient is missing or exactly zero (``no_gradient``'s), and steps with NaN/Inf values.

A finding is raised once some layers have been vanishing for ``window`` consecutive judged steps, and it names
them as a range ("layers 0.weight to 8.bias"). A healthy 20-layer ReLU network spans about one to two orders of
magnitude between its layers; the default of 3 orders leaves room for that. On the evaluation zoo a 20-layer
sigmoid network is reported at step 9 naming a contiguous block of input-side layers, and none of the healthy
scenarios raises anything; on ``benchmarks/architectures.py`` none of 34 healthy architectures does (11 did
before the depth profile: BERT-like encoders, BART, CLIP and wav2vec2 by their query/key projections, MobileNetV2
and EfficientNet by their projection BatchNorm biases), while an EfficientNet with transformers' N(0, 0.02)
BatchNorm weights is reported at step 9.

>>> from gfservice.testing import make_step, replay
>>> healthy = [1e-2] * 6
>>> dying = [1e-12, 1e-10] + [1e-2] * 4          # the first two layers' gradients are gone
>>> steps = [make_step(step=i, sum_sq=healthy) for i in range(5)]
>>> steps += [make_step(step=i, sum_sq=dying) for i in range(5, 20)]
>>> first = replay(Vanishing(window=5), steps)[0]      # it fires at every step while it persists
>>> first.step, first.layers, first.severity.value
(9, ['layer0', 'layer1'], 'warning')
>>> head_under_exploding = [1e8] * 5 + [1e-2]            # the last layer is fine: the others exploded
>>> replay(Vanishing(window=5), [make_step(step=i, sum_sq=head_under_exploding) for i in range(20)])
[]
>>> blocks = ("block.0.query", "block.0.value", "block.1.query", "block.1.value", "head")
>>> at_init = [1e-12, 1e-2, 1e-12, 1e-2, 1e-2]         # every block's query alike: no depth profile
>>> replay(Vanishing(window=5), [make_step(step=i, layers=blocks, sum_sq=at_init) for i in range(20)])
[]
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats, describe_layers

_ROLE_DIGITS = re.compile(r"\d+")


class Vanishing(Detector):
    """Vanishing gradients: layers orders of magnitude below the median layer, or under an absolute floor."""

    name = "vanishing"

    class Config(DetectorConfig):
        #: Orders of magnitude below the reference layer (and below a layer on the output side).
        orders: float = Field(3.0, gt=0)
        #: Absolute floor on mean |g| (SageMaker Debugger's VanishingGradient threshold).
        floor: float = Field(1e-7, ge=0)
        #: Consecutive judged steps before a layer is reported; also the steps of the early reference.
        window: int = Field(10, ge=1)

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        super().__init__(config, **overrides)
        self._streak: np.ndarray | None = None
        #: log10 of the median layer RMS of the first ``window`` judged steps.
        self._early: list[float] = []
        self._siblings: tuple[tuple[str, ...], list[np.ndarray]] | None = None
        self._roles: tuple[tuple[str, ...], RoleOrder] | None = None

    def _module_siblings(self, layers: tuple[str, ...]) -> list[np.ndarray]:
        """For each layer, the other layers of its module (same name up to the last dot)."""
        if self._siblings is None or self._siblings[0] != layers:
            prefix = [n.rpartition(".")[0] for n in layers]
            groups: dict[str, list[int]] = {}
            for i, p in enumerate(prefix):
                if p:
                    groups.setdefault(p, []).append(i)
            sib = [np.array([j for j in groups.get(p, ()) if j != i], dtype=np.int64) for i, p in enumerate(prefix)]
            self._siblings = (layers, sib)
        return self._siblings[1]

    def _role_order(self, layers: tuple[str, ...]) -> RoleOrder:
        if self._roles is None or self._roles[0] != layers:
            self._roles = (layers, RoleOrder(layers))
        return self._roles[1]

    def update(self, step: StepStats) -> list[Finding] | None:
        g = step.grads
        n = len(g.layers)
        with np.errstate(invalid="ignore"):
            if n == 0 or g.nonfinite_layers.any():
                return None  # NaN/Inf: nonfinite's step
            rms = g.rms
            valid = (g.count > 0) & (g.sum_sq > 0) & np.isfinite(rms)
        if not valid.any():
            return None  # no gradient anywhere: no_gradient's
        cfg = self.config
        log_rms = np.full(n, -np.inf)
        log_rms[valid] = np.log10(rms[valid])
        current = float(np.median(log_rms[valid]))
        if len(self._early) < cfg.window:
            self._early.append(current)
        reference = min(current, float(np.median(self._early)))
        # Depth profile: a layer of the same role on the output side carries `orders` more.
        with np.errstate(invalid="ignore"):
            deeper = self._role_order(g.layers).largest_after(log_rms) - log_rms >= cfg.orders
        relative = valid & (log_rms < reference - cfg.orders) & deeper
        magnitude = g.mean_abs if g.mean_abs is not None else rms
        below_floor = valid & (magnitude < cfg.floor)
        everywhere = float(np.median(magnitude[valid])) < cfg.floor  # the whole gradient is tiny
        flagged = relative | (below_floor & (deeper | everywhere))
        flagged &= ~self._by_design(g.layers, g.count, g.units, log_rms, flagged)
        if self._streak is None or self._streak.shape != flagged.shape:
            self._streak = np.zeros(flagged.shape, dtype=np.int64)
        self._streak = np.where(flagged, self._streak + 1, 0)
        persistent = np.flatnonzero(self._streak >= cfg.window)
        if persistent.size == 0:
            return []
        names = [g.layers[i] for i in persistent]
        worst = float(np.min(rms[persistent]))
        ref = 10.0 ** reference
        advice = ("consider residual connections, normalisation, a non-saturating activation or a better "
                  "initialisation")
        if relative[persistent].any():
            why, threshold = f"{worst / ref:.1e} of the median layer's {ref:.2e}", ref * 10.0 ** (-cfg.orders)
        else:
            why, threshold = f"under the floor {cfg.floor:.0e}", cfg.floor
            if persistent.size == np.count_nonzero(valid):  # every layer alike: not a matter of depth
                advice = ("every layer is under it alike: check the loss (a reduction or a factor that makes it "
                          "tiny), gradient scaling and the precision of the gradients, or whether training is over")
        return [
            self.finding(
                step,
                "warning",
                f"{describe_layers(names)} {'has' if len(names) == 1 else 'have'} had vanishing gradients for "
                f"{cfg.window}+ steps (RMS down to {worst:.2e}, {why}) at step {step.step}; {advice}",
                layers=names,
                value=worst,
                threshold=threshold,
                key="layers",
            )
        ]

    def _by_design(self, layers: tuple[str, ...], count: np.ndarray, units: np.ndarray | None, log_rms: np.ndarray,
                   flagged: np.ndarray) -> np.ndarray:
        """Flagged 1-d parameters ``orders`` below an unflagged parameter of their own module at least as large."""
        out = np.zeros(len(layers), dtype=bool)
        one_d = flagged if units is None else flagged & (count == units)
        if not one_d.any():
            return out
        siblings = self._module_siblings(layers)
        for i in np.flatnonzero(one_d):
            sib = siblings[i]
            if sib.size:
                ok = sib[(count[sib] >= count[i]) & ~flagged[sib] & (log_rms[sib] - log_rms[i] >= self.config.orders)]
                out[i] = ok.size > 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"streak": self._streak, "early": list(self._early)}

    def load_state_dict(self, state: Any) -> None:
        self._streak = state.get("streak")
        self._early = [float(v) for v in state.get("early", [])]


class RoleOrder:
    """Layers grouped by role (the name with its digit runs as ``#``) for a segmented "largest later" per step.

    >>> RoleOrder(("0.weight", "0.bias", "2.weight", "2.bias", "head.weight")).largest_after(
    ...     np.array([-9.0, -8.0, -2.0, -np.inf, -1.0])).tolist()
    [-2.0, -inf, -inf, -inf, -inf]
    """

    #: Spacing between roles in the segmented maximum: more than the span of any log10 RMS (float64: +-330).
    _GAP = 1e4
    _NONE = -1e3

    def __init__(self, layers: tuple[str, ...]) -> None:
        roles: dict[str, int] = {}
        role = np.array([roles.setdefault(_ROLE_DIGITS.sub("#", n), len(roles)) for n in layers], dtype=np.float64)
        # Within each role, from the output side back to the input side.
        self.order = np.lexsort((-np.arange(len(layers)), role))
        self.offset = role[self.order] * self._GAP
        self.starts = np.ones(len(layers), dtype=bool)
        self.starts[1:] = self.offset[1:] != self.offset[:-1]

    def largest_after(self, log_rms: np.ndarray) -> np.ndarray:
        """For each layer, the largest ``log_rms`` of a later layer of its role (-inf where there is none)."""
        v = np.where(np.isfinite(log_rms), log_rms, self._NONE)[self.order] + self.offset
        running = np.maximum.accumulate(v)
        before = np.empty_like(running)
        before[0] = -np.inf
        before[1:] = running[:-1]
        before = np.where(self.starts, -np.inf, before - self.offset)
        out = np.empty_like(before)
        out[self.order] = before
        out[out <= self._NONE] = -np.inf
        return out
