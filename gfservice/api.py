"""What a detector plugin imports: :class:`Detector`, its :class:`DetectorConfig`, :class:`StepStats`
(the merged statistics of one training step) and :class:`Finding`.

A detector is a small class. It sees one merged step at a time, works on whole per-layer numpy
arrays, and returns findings; ``state_dict``/``load_state_dict`` let a restarted service resume.

>>> class TooQuiet(Detector):
...     "Global gradient norm below a floor."
...     name = "too_quiet"
...     class Config(DetectorConfig):
...         floor: float = 1e-6
...     def update(self, step):
...         norm = step.global_norm
...         if norm < self.config.floor:
...             return [self.finding(step, "warning", f"global gradient norm {norm:.1e} is below the floor",
...                                  value=norm, threshold=self.config.floor)]
...         return []
>>> from gfservice.testing import make_step
>>> [f.message for f in TooQuiet(floor=1.0).update(make_step(sum_sq=[0.01]))]
['global gradient norm 1.0e-01 is below the floor']
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gfservice.stats import GradStats

__all__ = [
    "Detector",
    "DetectorConfig",
    "Finding",
    "GradStats",
    "Severity",
    "StepStats",
    "describe_layers",
]


class Severity(str, Enum):
    """How urgent a finding is: ``critical`` pages, ``warning`` makes a ticket, ``info`` is shown only."""

    info = "info"
    warning = "warning"
    critical = "critical"

    @property
    def rank(self) -> int:
        return ("info", "warning", "critical").index(self.value)


class Finding(BaseModel):
    """One thing a detector noticed about one run, at one step, that a person can act on.

    An immutable value. A detector returns it with the step it judged; the aggregator keeps the lifecycle
    (first and last step, occurrences, active or cleared) in its own record and hands out copies with those
    fields filled in.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    detector: str
    severity: Severity
    run: str
    step: int
    message: str
    layers: list[str] = Field(default_factory=list)
    ranks: list[int] = Field(default_factory=list)
    value: float | None = None
    threshold: float | None = None
    #: Distinguishes several concurrent findings of one detector (e.g. "cap" and "spike").
    key: str = ""
    time: float = Field(default_factory=time.time)
    # Lifecycle: filled in by the aggregator on the copies it hands out (None / defaults on a detector's own).
    first_step: int | None = None
    last_step: int | None = None
    #: Steps at which the detector reported it while it was active.
    occurrences: int = 1
    active: bool = True
    #: Unix time at which it cleared (None while active).
    cleared_time: float | None = None
    #: The run's detector configuration version that raised it: 0 as the run started, one more for each
    #: change applied with ``gfservice configure`` (see ``Aggregator.config_changes``).
    config: int = 0
    #: The attempt (start) of the run in which it was first raised ("" when the senders do not tell attempts apart).
    attempt: str = ""

    @property
    def identity(self) -> tuple[str, str]:
        """What makes two findings of one run the same while active: the detector and its key."""
        return (self.detector, self.key)

    @property
    def since(self) -> int:
        """The step at which it was first raised (its own step for a detector's fresh finding)."""
        return self.step if self.first_step is None else self.first_step

    def __str__(self) -> str:
        return f"[{self.severity.value}] {self.detector} @ step {self.since}: {self.message}"


@dataclass(eq=False)
class StepStats:
    """The merged statistics of one training step of one run, as detectors see them.

    Per-layer arrays are in the model's parameter order (input to output). Rank-level arrays (``rank_norm``,
    ``rank_nonfinite``, ``step_time``, ``compute_time``) have one entry per rank of ``ranks``, the ranks that
    reported (merged steps: sparse, never sized by a claimed world size), NaN (or False) where a rank did not
    say; without ``ranks`` entry ``i`` is rank ``i``. :attr:`rank_ids` reads the ranks either way.

    >>> from gfservice.testing import make_step
    >>> s = make_step(sum_sq=[1.0], rank_norm=[1.0, 5.0], ranks=[3, 12345])
    >>> s.rank_ids.tolist(), s.rank_ids[np.argmax(s.rank_norm)]
    ([3, 12345], np.int64(12345))
    >>> make_step(sum_sq=[1.0], step_time=[0.1, 0.2]).rank_ids.tolist()
    [0, 1]
    """

    run: str
    step: int
    grads: GradStats
    time: float = field(default_factory=time.time)
    loss: float | None = None
    lr: float | None = None
    loss_scale: float | None = None
    #: True when a GradScaler skipped the optimizer step (non-finite gradients at this scale).
    skipped: bool = False
    #: Local (pre-allreduce) global gradient norm of each rank, where known.
    rank_norm: np.ndarray | None = None
    #: Whether each rank's local gradients held NaN/Inf before they were reduced.
    rank_nonfinite: np.ndarray | None = None
    #: Seconds each rank spent on the step, where known.
    step_time: np.ndarray | None = None
    #: Seconds from the end of each rank's previous step until its first gradient bucket was ready, where
    #: known (data, forward and backward: what differs between ranks that wait for each other).
    compute_time: np.ndarray | None = None
    #: Ranks whose report had not arrived when the step was merged.
    missing_ranks: tuple[int, ...] = ()
    #: The rank of each entry of the rank-level arrays, ascending; None: entry ``i`` is rank ``i``.
    ranks: np.ndarray | None = None
    #: The optimizer's learning rate and weight decay per parameter group at this step, where the sender read
    #: them (None otherwise, e.g. older senders).
    group_lr: np.ndarray | None = None
    group_wd: np.ndarray | None = None
    #: The parameter group of each layer (-1: in no group), where known (deep steps).
    layer_group: np.ndarray | None = None
    #: The kind of module of each layer ("embedding", or ""), where the sender said (see ``Layout.kinds``).
    layer_kinds: tuple[str, ...] | None = None
    #: The low-precision format the gradients are held in, read from the run ("fp16", "bf16": the parameters'
    #: dtype), or None (fp32, not known).
    precision: str | None = None
    #: Autocast's low-precision format when it was on at collection ("fp16", "bf16"), or None.
    autocast: str | None = None
    #: With the monitor's guard on: the steps whose update it skipped so far, by reason (cumulative), else None.
    guard_skips: dict[str, int] | None = None

    @property
    def layers(self) -> tuple[str, ...]:
        return self.grads.layers

    @property
    def global_norm(self) -> float:
        return self.grads.global_norm

    @property
    def rank_ids(self) -> np.ndarray:
        """The rank of each entry of the rank-level arrays (empty when the step has none)."""
        if self.ranks is not None:
            return np.asarray(self.ranks, dtype=np.int64)
        return np.arange(max((len(a) for a in (self.rank_norm, self.rank_nonfinite, self.step_time,
                                               self.compute_time) if a is not None), default=0), dtype=np.int64)

    def ranks_of(self, values: np.ndarray) -> np.ndarray:
        """The rank of each entry of ``values``, one of the rank-level arrays (see :attr:`rank_ids`); entry ``i`` is
        rank ``i`` when ``values`` does not match ``ranks`` (a step whose arrays were replaced densely)."""
        if self.ranks is not None and len(self.ranks) == len(values):
            return np.asarray(self.ranks, dtype=np.int64)
        return np.arange(len(values), dtype=np.int64)

    @property
    def weight_norm(self) -> np.ndarray | None:
        """L2 norm of each layer's weights after the optimizer step (deep steps that saw it)."""
        return self.grads.weight_norm

    @property
    def update_ratio(self) -> np.ndarray | None:
        """|update| / |weights| per layer on deep steps that saw the optimizer step."""
        return self.grads.update_ratio

    def per_layer(self, groups: np.ndarray | None) -> np.ndarray | None:
        """A per-group value (``group_lr``, ``group_wd``) for each layer (NaN for layers in no group), or None.

        >>> from gfservice.testing import make_step
        >>> s = make_step(sum_sq=[1.0, 1.0], group_lr=[0.1, 0.01], layer_group=[1, -1])
        >>> s.per_layer(s.group_lr).tolist()
        [0.01, nan]
        """
        if groups is None or self.layer_group is None or len(self.layer_group) != len(self.layers):
            return None
        values = np.append(np.asarray(groups, np.float64), np.nan)  # index -1 reads the NaN
        out: np.ndarray = values[self.layer_group]
        return out


class DetectorConfig(BaseModel):
    """Fields every detector has; subclass it as ``Config`` inside the detector to add its own."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    #: When a finding of at least this detector's severity fires, ask the training job to stop.
    stop_run: bool = False


class Detector:
    """Base class of detector plugins. Subclasses set ``name``, a docstring, ``Config``, ``update``.

    One instance watches one run; the service makes a fresh one per run.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[DetectorConfig]] = DetectorConfig

    def __init__(self, config: DetectorConfig | Mapping[str, Any] | None = None, **overrides: Any):
        if isinstance(config, DetectorConfig):
            config = config.model_dump()
        self.config = self.Config(**{**(config or {}), **overrides})

    @classmethod
    def summary(cls) -> str:
        """One line on what the detector detects: the first line of its docstring."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def update(self, step: StepStats) -> list[Finding]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: plain Python and numpy values only."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def finding(
        self,
        step: StepStats,
        severity: Severity | str,
        message: str,
        *,
        layers: Sequence[str] = (),
        ranks: Sequence[int] = (),
        value: float | None = None,
        threshold: float | None = None,
        key: str = "",
    ) -> Finding:
        """Build a :class:`Finding` for ``step`` with this detector's name."""
        return Finding(
            detector=self.name,
            severity=Severity(severity),
            run=step.run,
            step=step.step,
            message=message,
            layers=list(layers),
            ranks=[int(r) for r in ranks],
            value=None if value is None else float(value),
            threshold=None if threshold is None else float(threshold),
            key=key,
        )


def describe_layers(names: Sequence[str], limit: int = 3) -> str:
    """A short human description of a set of layers, as a range when they are many.

    >>> describe_layers(["0.weight"])
    'layer 0.weight'
    >>> describe_layers(["0.weight", "0.bias"])
    'layers 0.weight, 0.bias'
    >>> describe_layers([f"{i}.weight" for i in range(9)])
    'layers 0.weight to 8.weight (9 layers)'
    """
    names = list(names)
    if not names:
        return "no layers"
    if len(names) == 1:
        return f"layer {names[0]}"
    if len(names) <= limit:
        return "layers " + ", ".join(names)
    return f"layers {names[0]} to {names[-1]} ({len(names)} layers)"
