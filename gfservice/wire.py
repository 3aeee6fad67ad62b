"""Wire messages between training processes and the aggregator, validated with pydantic.

A rank sends its :class:`Layout` once (layer names, sizes, which are sharded), then one
:class:`StepReport` per collected step carrying only arrays in that layout's order.

>>> lay = Layout(run="exp-1", rank=0, world_size=1, layers=["w", "b"], numel=[6, 2], sharded=[False, False])
>>> rep = StepReport(run="exp-1", rank=0, step=3, count=[6, 2], sum_sq=[1.0, 0.5], max_abs=[0.9, 0.5],
...                  nonfinite=[0, 0])
>>> rep.sum_sq.dtype, rep.n_layers
(dtype('float64'), 2)
>>> StepReport(run="exp 1!", rank=0, step=0)
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for StepReport
run
  String should match pattern ...
"""

from __future__ import annotations

import math
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, model_validator

from gfservice.stats import EXP_BINS, GradStats

#: A run name: what the ``run`` label of every metric carries.
RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,128}$")]

#: Hard ceiling on layers per message; the aggregator's configured limit is usually lower.
MAX_LAYERS = 1_000_000


def _array(dtype, ndim: int = 1):
    def convert(v: Any) -> np.ndarray:
        a = np.asarray(v)
        if a.dtype == object:
            raise ValueError("not a numeric array")
        if a.ndim != ndim:
            raise ValueError(f"expected a {ndim}-d array, got shape {a.shape}")
        if a.shape[0] > MAX_LAYERS:
            raise ValueError(f"{a.shape[0]} entries is over the limit of {MAX_LAYERS}")
        if ndim == 2 and a.shape[1] != EXP_BINS:
            raise ValueError(f"exponent histogram needs {EXP_BINS} bins, got {a.shape[1]}")
        if np.dtype(dtype).kind in "iu":
            if a.size and a.dtype.kind == "f" and not np.all(np.isfinite(a)):
                raise ValueError("counts must be finite")
            out = a.astype(dtype, copy=False)
            if out.size and out.min() < 0:
                raise ValueError("counts must not be negative")
            return out
        return a.astype(dtype, copy=False)

    return Annotated[np.ndarray, BeforeValidator(convert), PlainSerializer(lambda a: a.tolist())]


Floats = _array(np.float64)
Counts = _array(np.int64)
Histogram = _array(np.int64, ndim=2)


class Layout(BaseModel):
    """The layers one rank reports, sent once per (run, rank) before its first step."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: RunName
    rank: int = Field(ge=0)
    world_size: int = Field(ge=1, le=1_000_000)
    layers: list[str] = Field(default_factory=list, max_length=MAX_LAYERS)
    #: Elements of each layer's full (unsharded) parameter.
    numel: list[int] = Field(default_factory=list, max_length=MAX_LAYERS)
    #: Whether each layer is sharded across ranks (FSDP2): then every rank reports its shard.
    sharded: list[bool] = Field(default_factory=list, max_length=MAX_LAYERS)
    #: False for ranks that send only a heartbeat (DDP ranks other than the reporting one).
    reports_layers: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> Layout:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if not (len(self.layers) == len(self.numel) == len(self.sharded)):
            raise ValueError("layers, numel and sharded must have the same length")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layer names must be unique")
        if self.reports_layers and not self.layers:
            raise ValueError("a layout that reports layers needs at least one layer")
        return self


class RunEnd(BaseModel):
    """Sent by a rank when its monitor closes: the run is over for that rank (not stalled)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: RunName
    rank: int = Field(ge=0)
    end: bool = True


class StepReport(BaseModel):
    """One rank's statistics for one collected step, in its layout's layer order."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    run: RunName
    rank: int = Field(ge=0)
    step: int = Field(ge=0)
    time: float = 0.0
    count: Counts = Field(default_factory=lambda: np.zeros(0, np.int64))
    sum_sq: Floats = Field(default_factory=lambda: np.zeros(0))
    max_abs: Floats = Field(default_factory=lambda: np.zeros(0))
    nonfinite: Counts = Field(default_factory=lambda: np.zeros(0, np.int64))
    sum_abs: Floats | None = None
    zeros: Counts | None = None
    exp_hist: Histogram | None = None
    #: Per-layer L2 norm of the weights after the optimizer step, and of that step's update (deep steps).
    weight_norm: Floats | None = None
    update_norm: Floats | None = None
    loss: float | None = None
    lr: float | None = None
    loss_scale: float | None = None
    skipped: bool = False
    #: This rank's own global gradient norm before the gradients were reduced across ranks.
    local_norm: float | None = None
    #: Whether this rank's local gradients held NaN/Inf before they were reduced.
    local_nonfinite: bool = False
    #: Seconds since this rank's previous report, per step.
    step_time: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> StepReport:
        for name in ("time", "lr", "loss_scale", "step_time"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
        n = len(self.count)
        for name in ("sum_sq", "max_abs", "nonfinite", "sum_abs", "zeros", "exp_hist", "weight_norm",
                     "update_norm"):
            a = getattr(self, name)
            if a is not None and len(a) != n and not (name in ("weight_norm", "update_norm") and len(a) == 0):
                raise ValueError(f"{name} has {len(a)} entries but count has {n}")
        deep = [getattr(self, k) is None for k in ("sum_abs", "zeros", "exp_hist")]
        if any(deep) and not all(deep):
            raise ValueError("deep statistics come together: sum_abs, zeros and exp_hist")
        return self

    @property
    def n_layers(self) -> int:
        return len(self.count)

    def grad_stats(self, layers: tuple[str, ...]) -> GradStats:
        return GradStats(
            layers=layers,
            count=self.count,
            sum_sq=self.sum_sq,
            max_abs=self.max_abs,
            nonfinite=self.nonfinite,
            sum_abs=self.sum_abs,
            zeros=self.zeros,
            exp_hist=self.exp_hist,
        )
