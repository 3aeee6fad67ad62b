"""The protocol between training processes and the aggregator: typed messages, validated with pydantic.

Every message carries a ``kind`` (``layout``, ``step`` or ``end``) and the protocol ``version``. A rank sends
its :class:`Layout` once (layer names, sizes, which are sharded), then one :class:`StepReport` per collected
step carrying only arrays in that layout's order, and a :class:`RunEnd` when its monitor closes. The
per-layer arrays of a report are the statistics declared in :mod:`gfservice.stats`, under ``stats``.
:func:`parse` turns a dict or a message object into a validated message, or raises :class:`Rejected` with
a :class:`RejectReason`.

>>> lay = parse({"kind": "layout", "run": "exp-1", "rank": 0, "world_size": 1, "layers": ["w", "b"],
...              "numel": [6, 2], "sharded": [False, False]})
>>> rep = parse({"kind": "step", "run": "exp-1", "rank": 0, "step": 3,
...              "stats": {"count": [6, 2], "sum_sq": [1.0, 0.5], "max_abs": [0.9, 0.5], "nonfinite": [0, 0]}})
>>> rep.stats["sum_sq"].dtype, rep.n_layers
(dtype('float64'), 2)
>>> parse({"kind": "step", "version": 99, "run": "r", "rank": 0, "step": 0})
Traceback (most recent call last):
...
gfservice.wire.Rejected: unsupported_version: protocol version 99; this service speaks 1
>>> parse({"kind": "step", "run": "exp 1!", "rank": 0, "step": 0}).run
Traceback (most recent call last):
...
gfservice.wire.Rejected: invalid: step.run: String should match pattern ...
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gfservice.stats import BY_NAME, TIERS, Array, GradStats

__all__ = [
    "MAX_LAYERS",
    "PROTOCOL_VERSION",
    "Layout",
    "Message",
    "RejectReason",
    "Rejected",
    "RunEnd",
    "StepReport",
    "parse",
]

#: The protocol version this package speaks; a message of another version is rejected.
PROTOCOL_VERSION = 1
#: Hard ceiling on layers per message; the aggregator's configured limit is usually lower.
MAX_LAYERS = 1_000_000

#: A run name: what the ``run`` label of every metric carries.
RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]{1,128}$")]
#: One start of a run's monitors (shared by all ranks of that start): a restarted job is a new attempt of its run.
#: Empty for senders that do not tell attempts apart.
AttemptId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]{0,128}$")]


class RejectReason(str, Enum):
    """Why a message was refused: shared by the aggregator, the exporter and the senders."""

    invalid = "invalid"
    oversized = "oversized"
    unsupported_version = "unsupported_version"
    unknown_kind = "unknown_kind"
    unknown_run = "unknown_run"
    unknown_rank = "unknown_rank"
    shape_mismatch = "shape_mismatch"
    layout_mismatch = "layout_mismatch"
    stale_step = "stale_step"
    duplicate = "duplicate"
    #: A message of an earlier attempt of its run, arriving after a newer attempt started.
    stale_attempt = "stale_attempt"


class Rejected(ValueError):
    """A message the aggregator will not take, with its :class:`RejectReason` and a detail for people."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def _statistic_array(name: str, value: Any) -> Array:
    """``value`` as the declared dtype and shape of statistic ``name``; raises ``ValueError`` when it is not."""
    s = BY_NAME[name]
    a = np.asarray(value)
    if a.dtype == object or a.dtype.kind not in "biuf":
        raise ValueError(f"{name}: not a numeric array")
    if a.ndim != s.ndim:
        raise ValueError(f"{name}: expected a {s.ndim}-d array, got shape {a.shape}")
    if a.shape[0] > MAX_LAYERS:
        raise PydanticCustomError("oversized", "{name}: {n} entries is over the limit of {limit}",
                                  {"name": name, "n": a.shape[0], "limit": MAX_LAYERS})
    if s.bins and a.shape[1] != s.bins:
        raise ValueError(f"{name}: needs {s.bins} bins, got {a.shape[1]}")
    if np.dtype(s.dtype).kind in "iu":
        if a.dtype.kind == "f" and a.size and not (np.all(np.isfinite(a)) and np.all(a == np.floor(a))):
            raise ValueError(f"{name}: counts must be finite whole numbers")
        out = a.astype(s.dtype, copy=False)
        if out.size and out.min() < 0:
            raise ValueError(f"{name}: counts must not be negative")
        return out
    out = a.astype(s.dtype, copy=False)
    if out.size and np.any(out < 0):  # NaN compares False: non-finite sums pass, negative ones do not
        raise ValueError(f"{name}: must not be negative")
    return out


def _stats_mapping(value: Any) -> dict[str, Array]:
    if not isinstance(value, Mapping):
        raise ValueError("stats must be a mapping of statistic name to array")
    unknown = sorted(set(value) - set(BY_NAME))
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; known: {sorted(BY_NAME)}")
    return {name: _statistic_array(name, value[name]) for name in BY_NAME if name in value}


StatArrays = Annotated[
    dict[str, Array],
    BeforeValidator(_stats_mapping),
    PlainSerializer(lambda d: {k: v.tolist() for k, v in d.items()}),
]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, revalidate_instances="always",
                              arbitrary_types_allowed=True)

    version: Literal[1] = 1  # PROTOCOL_VERSION
    run: RunName
    rank: int = Field(ge=0, le=1_000_000)
    #: The attempt (start) of the run this message belongs to; see :data:`AttemptId`.
    attempt: AttemptId = ""


class Layout(_Message):
    """The layers one rank reports, sent once per (run, rank) before its first step."""

    kind: Literal["layout"] = "layout"
    world_size: int = Field(ge=1, le=1_000_000)
    layers: list[Annotated[str, Field(min_length=1, max_length=512)]] = Field(default_factory=list,
                                                                               max_length=MAX_LAYERS)
    #: Elements of each layer's full (unsharded) parameter.
    numel: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=MAX_LAYERS)
    #: Whether each layer is sharded across ranks (FSDP2): then every rank reports its shard.
    sharded: list[bool] = Field(default_factory=list, max_length=MAX_LAYERS)
    #: Output units (rows) of each layer's full parameter; empty when not known.
    units: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=MAX_LAYERS)
    #: False for ranks that send only a heartbeat (DDP ranks other than the reporting one).
    reports_layers: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> Layout:
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if not (len(self.layers) == len(self.numel) == len(self.sharded)):
            raise ValueError("layers, numel and sharded must have the same length")
        if self.units and len(self.units) != len(self.layers):
            raise ValueError("units must be empty or have one entry per layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layer names must be unique")
        if self.reports_layers and not self.layers:
            raise ValueError("a layout that reports layers needs at least one layer")
        return self


class RunEnd(_Message):
    """Sent by a rank when its monitor closes: the run is over for that rank (not stalled)."""

    kind: Literal["end"] = "end"


def _finite_or_none(v: float | None, name: str) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


class StepReport(_Message):
    """One rank's statistics for one collected step, in its layout's layer order.

    ``stats`` holds the per-layer statistics (see :data:`gfservice.stats.STATISTICS`): the core ones, or
    none at all for a heartbeat, plus every statistic of a tier or none of it.
    """

    kind: Literal["step"] = "step"
    step: int = Field(ge=0, le=2**53)
    time: float = 0.0
    stats: StatArrays = Field(default_factory=dict)
    loss: float | None = None
    lr: float | None = None
    loss_scale: float | None = None
    #: True when a GradScaler skipped the optimizer step (non-finite gradients at this scale).
    skipped: bool = False
    #: This rank's own global gradient norm before the gradients were reduced across ranks.
    local_norm: float | None = Field(None, ge=0)
    #: Whether this rank's local gradients held NaN/Inf before they were reduced.
    local_nonfinite: bool = False
    #: Seconds since this rank's previous report, per step.
    step_time: float | None = Field(None, ge=0)
    #: Seconds from the end of this rank's previous step until its first gradient bucket was ready (its data
    #: loading, forward and backward: what differs between ranks that wait for each other in the all-reduce).
    compute_time: float | None = Field(None, ge=0)

    @field_validator("time", "lr", "loss_scale", "local_norm", "step_time", "compute_time")
    @classmethod
    def _finite(cls, v: float | None, info: Any) -> float | None:
        return _finite_or_none(v, info.field_name)

    @model_validator(mode="before")
    @classmethod
    def _flat_statistics(cls, data: Any) -> Any:
        """Accept statistics at the top level too (``{"count": [...], ...}``), as hand-written messages do."""
        if isinstance(data, Mapping) and any(k in BY_NAME for k in data):
            data = dict(data)
            stats = dict(data.get("stats") or {})
            for k in [k for k in data if k in BY_NAME]:
                stats[k] = data.pop(k)
            data["stats"] = stats
        return data

    @model_validator(mode="after")
    def _consistent(self) -> StepReport:
        if not self.stats:
            return self
        missing = [n for n in TIERS["core"] if n not in self.stats]
        if missing:
            raise ValueError(f"core statistics missing: {missing}")
        for tier in ("deep", "update"):
            present = [n for n in TIERS[tier] if n in self.stats]
            if present and len(present) != len(TIERS[tier]):
                raise ValueError(f"{tier} statistics come together: {list(TIERS[tier])}")
        n = self.n_layers
        for name, a in self.stats.items():
            if len(a) != n:
                raise ValueError(f"{name} has {len(a)} entries but count has {n}")
        return self

    @property
    def n_layers(self) -> int:
        count = self.stats.get("count")
        return 0 if count is None else len(count)

    def grad_stats(self, layers: tuple[str, ...], units: Array | None = None) -> GradStats:
        """The statistics as :class:`GradStats` for the layout's ``layers``."""
        return GradStats(layers=layers, units=units, **self.stats)


#: Any message, told apart by its ``kind``.
Message = Annotated[Layout | StepReport | RunEnd, Field(discriminator="kind")]
_MESSAGE: TypeAdapter[Layout | StepReport | RunEnd] = TypeAdapter(Message)
_KINDS = ("layout", "step", "end")


def parse(message: Any) -> Layout | StepReport | RunEnd:
    """Validate one message (a dict, or a message object: validated the same way); raises :class:`Rejected`."""
    data: BaseModel | Mapping[str, Any]
    kind: Any
    version: Any
    if isinstance(message, Layout | StepReport | RunEnd):
        kind, version, data = message.kind, message.version, message
    elif isinstance(message, Mapping):
        kind, version, data = message.get("kind"), message.get("version", PROTOCOL_VERSION), message
    else:
        raise Rejected(RejectReason.invalid, f"expected a mapping, got {type(message).__name__}")
    if version != PROTOCOL_VERSION:
        raise Rejected(RejectReason.unsupported_version,
                       f"protocol version {version!r}; this service speaks {PROTOCOL_VERSION}")
    if kind not in _KINDS:
        raise Rejected(RejectReason.unknown_kind, f"kind {kind!r}; expected one of {', '.join(_KINDS)}")
    try:
        if isinstance(data, BaseModel):
            return type(data).model_validate(data)
        return _MESSAGE.validate_python(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        where = ".".join(loc[1:] if loc and loc[0] == kind else loc)
        oversized = first["type"] in ("oversized", "too_long")
        reason = RejectReason.oversized if oversized else RejectReason.invalid
        raise Rejected(reason, f"{kind}.{where}: {first['msg']}") from None
