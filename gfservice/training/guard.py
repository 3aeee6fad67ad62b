"""Guard mode: judge each step's gradients before ``optimizer.step()`` and keep a poisoned step off the weights.

The rule (:func:`judge`, pure) reads what the monitor already collects at the end of backward, before any
clipping: the global gradient norm, whether any gradient value is NaN/Inf, and the loss where it is known.

- A NaN/Inf gradient value, or a NaN/Inf loss: always poisoned (``nonfinite_gradient``, ``nonfinite_loss``).
- A gradient-norm explosion against the run's own recent history (``gradient_norm``): once ``warmup`` accepted
  steps are in the history, log(norm) against the median and MAD of the last ``window`` accepted steps. A step
  is poisoned when its norm stands both ``ratio`` times above the median norm and ``z`` robust standard deviations
  (1.4826 MAD) above it in log space: ``log(norm) > median + max(log(ratio), z * 1.4826 * MAD)``, and above the
  run's own early scale (the median of its first ``scale_steps`` accepted norms: a run that has all but converged
  makes 40x jumps on a noisy batch that stay below the norms it started with, as the exploding detector's rule
  says; off by default). That bound is also the ``clip`` policy's threshold. Only accepted steps enter the
  history, so a spike
  does not hide the next.
- A learning rate that jumps (``learning_rate``): once ``warmup`` steps are accepted, a step whose learning rate
  (the largest of its parameter groups, as ``optimizer.step()`` is about to use it) is more than ``lr_ratio``
  times the largest the run used on an accepted step. Its gradients look normal, the damage is the update: a
  scheduler bug or a mistyped LR. Warm-up, decay, restarts (SGDR returns to an LR it used before) and one-cycle
  schedules rise by far less than 10x in a step above their own maximum. A deliberate 10x raise is skipped
  ``max_consecutive`` times, then let through with a critical finding, and learned.
- Optionally (``per_layer``) the same rule on each layer's norm against that layer's own history
  (``layer_norm``).

:class:`Guard` keeps the history and the count of consecutive poisoned steps: after ``max_consecutive`` of
them it stops acting (a run that only produces poisoned steps needs a person, not silence) until a clean step.

>>> guard = Guard(GuardConfig(warmup=5))
>>> [guard.settle(i, guard.verdict(1.0 + 0.01 * (i % 3))).act for i in range(6)]
[False, False, False, False, False, False]
>>> v = guard.verdict(1e3)                       # a 1000x jump
>>> v.poisoned, v.reason, round(v.limit, 1)
(True, 'gradient_norm', 101.0)
>>> guard.verdict(float("nan")).reason, guard.verdict(1.0, loss=float("inf")).reason
('nonfinite_gradient', 'nonfinite_loss')
>>> guard.settle(6, v).act, guard.skipped
(True, [(6, 'gradient_norm')])
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gfservice.wire import GuardReason as Reason

__all__ = ["REASONS", "Decision", "Guard", "GuardConfig", "Verdict", "guard_config", "judge", "limit", "lr_jump",
           "replay"]

#: Why a step is poisoned: the ``reason`` label of ``gradflow_steps_skipped_total``.
REASONS: tuple[str, ...] = get_args(Reason)

#: 1 / Phi^-1(3/4): the MAD of a normal sample times this is its standard deviation.
MAD_TO_SIGMA = 1.4826


class GuardConfig(BaseModel):
    """What the guard judges and does. Defaults measured on the evaluation zoo's healthy runs (see
    ``docs/howto/guard.md``): none of their steps is judged poisoned.

    >>> GuardConfig().policy, GuardConfig(policy="clip").policy
    ('skip', 'clip')
    >>> GuardConfig(warmup=200)
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for GuardConfig
      Value error, warmup (200) must not exceed window (100) [type=value_error, ...]
    ...
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: ``skip``: the optimizer step of a poisoned step is a no-op; ``clip``: its gradients are rescaled to the
    #: guard's threshold instead (a non-finite step is skipped either way: there is nothing to rescale).
    policy: Literal["skip", "clip"] = "skip"
    #: Accepted steps whose gradient norms the rule compares against (a rolling window).
    window: int = Field(100, ge=4)
    #: Accepted steps in the history before the norm rule judges (non-finite values are judged from the first).
    warmup: int = Field(20, ge=2)
    #: A poisoned norm stands this many robust standard deviations of log(norm) above the median ... (the zoo's
    #: healthy runs, 123 scenarios x 3 seeds replayed: no skip even at 2 with the default ratio; at 6 the term
    #: bound a clipped LSTM's limit at 900x its median and let 1000x batches through, at 3 only runs whose log
    #: norm scatters more than 1.5 (sigma) widen the ratio's limit)
    z: float = Field(3.0, gt=0)
    #: ... and this many times above the median norm (the zoo's healthy runs jump up to 38x over their median:
    #: 100 leaves 2.6x; a corrupted batch that blows the norm up 1000x is still 10x above it).
    ratio: float = Field(100.0, gt=1)
    #: ... and above the median of the run's first ``scale_steps`` accepted norms (0, the default: no such
    #: floor; it spares a converged run's noisy batches but lets through corruptions of a converged run).
    scale_steps: int = Field(0, ge=0)
    #: A learning rate more than this many times the largest used on an accepted step is poisoned (None: off).
    lr_ratio: float | None = Field(10.0, gt=1)
    #: Judge each layer's norm against its own history too (off by default).
    per_layer: bool = False
    #: Consecutive poisoned steps after which the guard stops acting and raises a critical finding.
    max_consecutive: int = Field(5, ge=1)
    #: Ask the run to stop (``monitor.should_stop``) once ``max_consecutive`` is reached.
    stop_run: bool = False
    #: With a fused optimizer that takes a device-side ``found_inf`` (``torch.optim.AdamW(fused=True)``), no
    #: GradScaler, policy ``skip``, no per-layer rule and no sharded parameters: judge on the gradients' device
    #: and let the optimizer skip the poisoned step itself (no host sync before the step; the guard's bookkeeping
    #: follows from the host copy one step late on CUDA). Off by default: on CPU it costs more than the host
    #: verdict (no sync to save) and its CUDA gain has not been measured on a GPU yet.
    device_verdict: bool = False

    @model_validator(mode="after")
    def _warmup_fits(self) -> GuardConfig:
        if self.warmup > self.window:
            raise ValueError(f"warmup ({self.warmup}) must not exceed window ({self.window})")
        return self


def guard_config(guard: bool | str | GuardConfig | None) -> GuardConfig | None:
    """What ``gfservice.monitor(..., guard=...)`` takes: True (the defaults), ``"skip"``, ``"clip"``, a
    :class:`GuardConfig`, or None/False (no guard).

    >>> guard_config(True) == GuardConfig(), guard_config("clip").policy, guard_config(False)
    (True, 'clip', None)
    """
    if guard is None or guard is False:
        return None
    if guard is True:
        return GuardConfig()
    if isinstance(guard, GuardConfig):
        return guard
    if guard == "skip":
        return GuardConfig(policy="skip")
    if guard == "clip":
        return GuardConfig(policy="clip")
    raise ValueError(f"guard={guard!r}: expected True, 'skip', 'clip' or a GuardConfig")


class Verdict(NamedTuple):
    """The guard's judgement of one step."""

    poisoned: bool
    reason: Reason | None = None
    #: The step's global gradient norm (NaN/Inf when a value was).
    norm: float = float("nan")
    #: The norm above which the rule judges a step poisoned (the ``clip`` threshold); None before warm-up.
    limit: float | None = None
    #: The layer that tripped the per-layer rule.
    layer: int | None = None


class Decision(NamedTuple):
    """What the guard does with a verdict (:meth:`Guard.settle`)."""

    #: Skip (or, with ``clip``, rescale) this step.
    act: bool
    #: This verdict ends the guard's patience: ``max_consecutive`` poisoned steps in a row (raise a finding).
    exhausted: bool = False


def _median_of_sorted(v: Sequence[float]) -> float:
    """The median of an ascending, non-empty ``v`` (the mean of the middle two for an even length, as numpy's).

    >>> _median_of_sorted([1.0, 2.0, 7.0]), _median_of_sorted([1.0, 2.0, 3.0, 9.0])
    (2.0, 2.5)
    """
    n = len(v)
    return (v[n // 2] + v[(n - 1) // 2]) / 2


def limit(history: Sequence[float] | np.ndarray, config: GuardConfig) -> float | None:
    """The log-norm above which a step is poisoned, from the log norms of the accepted steps; None before warm-up.

    >>> round(limit([0.0] * 30, GuardConfig()), 3)       # a flat history: the ratio alone (log 100)
    4.605
    >>> limit([0.0] * 5, GuardConfig()) is None
    True
    """
    # plain sorted lists: for the window's 100 numbers 4x quicker than numpy's medians (per step, on the
    # training thread)
    h = sorted(float(v) for v in history if math.isfinite(v))
    if len(h) < config.warmup:
        return None
    median = _median_of_sorted(h)
    sigma = MAD_TO_SIGMA * _median_of_sorted(sorted(abs(v - median) for v in h))
    return median + max(math.log(config.ratio), config.z * sigma)


def _log(norm: float) -> float:
    return math.log(norm) if norm > 0 else float("-inf")


def lr_jump(config: GuardConfig, lr: float | None, lr_max: float | None, accepted: int) -> bool:
    """Whether learning rate ``lr`` jumps more than ``lr_ratio`` times above ``lr_max`` (the largest of the
    ``accepted`` steps so far; judged after warm-up).

    >>> lr_jump(GuardConfig(warmup=3), 0.5, 0.01, 3), lr_jump(GuardConfig(warmup=3), 0.5, 0.01, 2)
    (True, False)
    """
    return (config.lr_ratio is not None and lr is not None and lr_max is not None and lr_max > 0
            and accepted >= config.warmup and lr > config.lr_ratio * lr_max)


def _floored(bound: float | None, floor: float | None) -> float | None:
    return bound if bound is None or floor is None else max(bound, floor)


def judge(config: GuardConfig, norm: float, history: Sequence[float] | np.ndarray, *, nonfinite: bool = False,
          loss: float | None = None, floor: float | None = None, layer_norms: np.ndarray | None = None,
          layer_history: np.ndarray | None = None, lr: float | None = None,
          lr_max: float | None = None) -> Verdict:
    """The verdict on a step whose global gradient norm is ``norm`` (``history``: log norms of the accepted steps;
    ``nonfinite``: some gradient value is NaN/Inf; ``floor``: the log of the run's early scale, below which no
    norm is an explosion; ``layer_norms`` and ``layer_history`` (steps x layers, log norms) for the per-layer
    rule; ``lr``: this step's learning rate, ``lr_max``: the largest of the accepted steps). Pure: nothing is kept.

    >>> cfg = GuardConfig(warmup=3)
    >>> judge(cfg, 150.0, [0.0, 0.1, -0.1]).reason, judge(cfg, 80.0, [0.0, 0.1, -0.1]).poisoned
    ('gradient_norm', False)
    >>> judge(cfg, 150.0, [0.0, 0.1, -0.1], floor=math.log(200.0)).poisoned   # still below the early scale
    False
    >>> judge(cfg, 1e9, []).poisoned                     # no history yet: only non-finite values count
    False
    >>> judge(cfg, 1.0, [], nonfinite=True).reason
    'nonfinite_gradient'
    >>> flat = [0.0] * 3
    >>> judge(cfg, 1.0, flat, lr=0.5, lr_max=0.01).reason, judge(cfg, 1.0, flat, lr=0.05, lr_max=0.01).poisoned
    ('learning_rate', False)
    """
    if nonfinite or not math.isfinite(norm):
        return Verdict(True, "nonfinite_gradient", norm)
    if loss is not None and not math.isfinite(loss):
        return Verdict(True, "nonfinite_loss", norm)
    if lr_jump(config, lr, lr_max, len(history)):
        return Verdict(True, "learning_rate", norm)
    bound = _floored(limit(history, config), floor)
    at = None if bound is None else math.exp(bound)
    if bound is not None and _log(norm) > bound:
        return Verdict(True, "gradient_norm", norm, at)
    if config.per_layer and layer_norms is not None and layer_history is not None and len(layer_history):
        for j in range(layer_history.shape[1]):
            b = limit(layer_history[:, j], config)
            if b is not None and _log(float(layer_norms[j])) > b:
                return Verdict(True, "layer_norm", norm, at, j)
    return Verdict(False, None, norm, at)


class Guard:
    """The guard of one run: its history of accepted norms, its consecutive poisoned steps and what it skipped.

    :meth:`verdict` judges (nothing changes); :meth:`settle` records the verdict of a step and says what to do.
    """

    def __init__(self, config: GuardConfig | None = None):
        self.config = config or GuardConfig()
        self._history: deque[float] = deque(maxlen=self.config.window)
        self._layers: deque[np.ndarray] = deque(maxlen=self.config.window)
        self._early: list[float] = []  # the first scale_steps accepted log norms
        self._lr_max: float | None = None  # the largest learning rate of an accepted step
        #: Poisoned verdicts in a row so far.
        self.consecutive = 0
        #: The steps the guard acted on (skipped, or rescaled with ``clip``), with the reason of each.
        self.skipped: list[tuple[int, str]] = []
        #: Poisoned steps let through because ``max_consecutive`` was reached.
        self.let_through: list[tuple[int, str]] = []

    def verdict(self, norm: float, *, nonfinite: bool = False, loss: float | None = None,
                layer_norms: np.ndarray | None = None, lr: float | None = None) -> Verdict:
        """The verdict on a step with global gradient norm ``norm`` (and learning rate ``lr``, where known)
        against this run's history (pure)."""
        layers = np.stack(list(self._layers)) if self.config.per_layer and self._layers else None
        return judge(self.config, norm, self._history, nonfinite=nonfinite, loss=loss, floor=self._floor(),
                     layer_norms=layer_norms, layer_history=layers, lr=lr, lr_max=self._lr_max)

    def _floor(self) -> float | None:
        return float(np.median(self._early)) if self._early else None

    def limit_norm(self) -> float | None:
        """The global norm above which the rule judges a step poisoned now (None before warm-up: then only
        NaN/Inf counts); what a verdict on the gradients' device compares against.

        >>> g = Guard(GuardConfig(warmup=2)); g.limit_norm() is None
        True
        >>> _ = [g.settle(i, g.verdict(1.0)) for i in range(2)]; round(g.limit_norm(), 6)
        100.0
        """
        bound = _floored(limit(self._history, self.config), self._floor())
        return None if bound is None else math.exp(bound)

    def lr_jump(self, lr: float | None) -> bool:
        """Whether ``lr`` is a learning-rate jump against the accepted steps (:func:`lr_jump`)."""
        return lr_jump(self.config, lr, self._lr_max, len(self._history))

    def settle(self, step: int, verdict: Verdict, layer_norms: np.ndarray | None = None,
               lr: float | None = None) -> Decision:
        """Record ``verdict`` on ``step``: a clean step enters the history; a poisoned one is acted on, unless it
        is the ``max_consecutive``-th in a row or later (then it is let through, and a finite one enters the
        history: a lasting change of level is learned rather than skipped forever)."""
        if not verdict.poisoned:
            self.consecutive = 0
            self._accept(verdict.norm, layer_norms, lr)
            return Decision(False)
        self.consecutive += 1
        reason = verdict.reason or "gradient_norm"
        if self.consecutive > self.config.max_consecutive:
            self.let_through.append((step, reason))
            if math.isfinite(verdict.norm):
                self._accept(verdict.norm, layer_norms, lr)
            return Decision(False, exhausted=self.consecutive == self.config.max_consecutive + 1)
        self.skipped.append((step, reason))
        return Decision(True)

    def _accept(self, norm: float, layer_norms: np.ndarray | None, lr: float | None = None) -> None:
        if lr is not None and math.isfinite(lr) and lr > 0:
            self._lr_max = lr if self._lr_max is None else max(self._lr_max, lr)
        if not math.isfinite(norm) or norm <= 0:
            return  # a step without gradient says nothing about the scale
        self._history.append(math.log(norm))
        if len(self._early) < self.config.scale_steps:
            self._early.append(math.log(norm))
        if self.config.per_layer and layer_norms is not None:
            with np.errstate(divide="ignore"):
                logs = np.log(np.asarray(layer_norms, np.float64))
            logs[~np.isfinite(logs)] = np.nan
            if self._layers and self._layers[-1].shape != logs.shape:
                self._layers.clear()
            self._layers.append(logs)


def replay(config: GuardConfig, steps: Iterable[tuple[Any, ...]]) -> Guard:
    """``config``'s guard run over a saved history: ``(step, global norm, any NaN/Inf, loss)`` rows, oldest
    first, with the learning rate as a fifth element where it is known. What it would have skipped is in
    ``.skipped``, what it would have let through in ``.let_through``.

    >>> rows = [(i, 1.0, False, 0.5) for i in range(30)] + [(30, 500.0, False, 0.5), (31, 1.0, True, None)]
    >>> replay(GuardConfig(), rows).skipped
    [(30, 'gradient_norm'), (31, 'nonfinite_gradient')]
    """
    guard = Guard(config)
    for step, norm, bad, loss, *rest in steps:
        lr = rest[0] if rest else None
        guard.settle(step, guard.verdict(norm, nonfinite=bad, loss=loss, lr=lr), lr=lr)
    return guard
