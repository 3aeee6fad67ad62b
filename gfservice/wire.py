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

Hostile values are refused whatever their form (a dict, or a message object built with ``model_construct`` or
changed after it was built): step numbers from 2**53 on, layer names that are too long (``limits``, e.g. the
aggregator's configuration) or hold control characters, negative or NaN magnitudes that no gradient explains,
fractional or negative counts, world sizes over the limit.

>>> parse({"kind": "step", "run": "r", "rank": 0, "step": 2**62})
Traceback (most recent call last):
...
gfservice.wire.Rejected: invalid: step.step: Input should be less than 9007199254740992
>>> parse({"kind": "step", "run": "r", "rank": 0, "step": 1, "stats": {"count": [4], "sum_sq": [float("nan")],
...        "max_abs": [0.5], "nonfinite": [0]}})
Traceback (most recent call last):
...
gfservice.wire.Rejected: invalid: step: sum_sq is NaN in layer 0 while its nonfinite count is 0 and ...
>>> parse({"kind": "layout", "run": "r", "rank": 0, "world_size": 1, "layers": ["w" * 300], "numel": [1],
...        "sharded": [False]}, Limits(max_layer_name=256))
Traceback (most recent call last):
...
gfservice.wire.Rejected: oversized: layout: a layer name of 300 characters; the limit is 256 (max_layer_name)
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, Protocol

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gfservice.stats import BY_NAME, TIERS, Array, GradStats

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_LAYERS",
    "MAX_STEP",
    "PROTOCOL_VERSION",
    "Layout",
    "Limits",
    "LimitsLike",
    "Message",
    "NodeRanks",
    "RankValues",
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
#: Step numbers (and sizes) stay below this: every one of them is exact as a float (JSON, Prometheus, numpy).
MAX_STEP = 2**53
#: Hard ceilings behind the configurable limits of :class:`Limits`.
MAX_LAYER_NAME = 4096
MAX_WORLD_SIZE = 1_000_000
#: Most optimizer parameter groups a report describes.
MAX_GROUPS = 100_000
#: Most ranks one node merge agent's message covers.
MAX_NODE_RANKS = 4096


class LimitsLike(Protocol):
    """What :func:`parse` reads of its ``limits``: :class:`Limits`, or the aggregator's configuration."""

    @property
    def max_layer_name(self) -> int: ...
    @property
    def max_world_size(self) -> int: ...


@dataclass(frozen=True)
class Limits:
    """The configurable bounds of :func:`parse` (``AggregatorConfig`` has the same fields, and is accepted).

    >>> Limits().max_count    # per-rank counts stay small enough to sum over max_world_size ranks in int64
    70368744177664
    """

    #: Longest layer name, in characters.
    max_layer_name: int = 256
    #: Largest world size of a run (ranks are below it).
    max_world_size: int = 65536

    @property
    def max_count(self) -> int:
        return max_count(self)


DEFAULT_LIMITS = Limits()


def max_count(limits: LimitsLike) -> int:
    """Largest count (elements, NaN/Inf values, zeros, histogram bins) one rank may report for a layer: the sum
    over ``max_world_size`` ranks still fits an int64."""
    return int(2**62 // max(1, limits.max_world_size))


def forbidden_char(text: str) -> str | None:
    """The first character of ``text`` that no name may hold (C0 and C1 controls, DEL, lone surrogates: those
    are not UTF-8), or None. Vectorised: a model's layer names are checked at once.

    >>> forbidden_char("blocks.0.attn.weight"), forbidden_char("tab\\there"), forbidden_char("x\\ud800")
    (None, '\\t', '\\ud800')
    """
    if text.isascii():
        a = np.frombuffer(text.encode("ascii"), np.uint8)
        bad = (a < 0x20) | (a == 0x7F)
    else:
        a = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        bad = (a < 0x20) | ((a >= 0x7F) & (a <= 0x9F)) | ((a >= 0xD800) & (a <= 0xDFFF))
    hit = np.flatnonzero(bad)
    return text[int(hit[0])] if hit.size else None


def _limits(info: ValidationInfo) -> LimitsLike:
    ctx = info.context
    return ctx if ctx is not None else DEFAULT_LIMITS

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
    #: The service has a token (``GFSERVICE_TOKEN``) and the batch came without it, or with a wrong one.
    unauthorized = "unauthorized"
    #: A step too far ahead of its run's newest step (``AggregatorConfig.max_step_jump``).
    step_jump = "step_jump"


class Rejected(ValueError):
    """A message the aggregator will not take, with its :class:`RejectReason` and a detail for people."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def _statistic_array(name: str, value: Any, most: int) -> Array:
    """``value`` as the declared dtype and shape of statistic ``name``; raises ``ValueError`` when it is not.

    Counts are whole, non-negative and at most ``most``; magnitudes are not negative (NaN and +Inf are judged
    with the other statistics of the layer, see :meth:`StepReport._consistent`).
    """
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
        if a.dtype.kind == "u" and a.size and a.max() > most:  # before the cast, which would wrap them
            raise ValueError(f"{name}: counts must be at most {most}")
        out = a.astype(s.dtype, copy=False)
        # one pass for both bounds: a negative count is huge as unsigned
        if out.size and int(out.view(np.uint64).max()) > most:
            if out.min() < 0:
                raise ValueError(f"{name}: counts must not be negative")
            raise ValueError(f"{name}: counts must be at most {most} (so that {name} sums over the ranks)")
        return out
    out = a.astype(s.dtype, copy=False)
    if out.size and np.fmin.reduce(out) < 0:  # fmin skips NaN: NaN sums pass here, negative ones (and -Inf) do not
        raise ValueError(f"{name}: must not be negative")
    return out


def _stats_mapping(value: Any, info: ValidationInfo) -> dict[str, Array]:
    if not isinstance(value, Mapping):
        raise ValueError("stats must be a mapping of statistic name to array")
    unknown = [k for k in value if k not in BY_NAME]
    if unknown:
        raise ValueError(f"unknown statistics {sorted(map(ascii, unknown))[:8]}; known: {sorted(BY_NAME)}")
    most = max_count(_limits(info))
    return {name: _statistic_array(name, value[name], most) for name in BY_NAME if name in value}


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
    rank: int = Field(ge=0, lt=MAX_WORLD_SIZE)
    #: The attempt (start) of the run this message belongs to; see :data:`AttemptId`.
    attempt: AttemptId = ""

    @model_validator(mode="after")
    def _rank_in_range(self, info: ValidationInfo) -> Any:
        most = _limits(info).max_world_size
        if self.rank >= most:
            raise ValueError(f"rank {self.rank} is not below the largest world size, {most} (max_world_size)")
        return self


class Layout(_Message):
    """The layers one rank reports, sent once per (run, rank) before its first step."""

    kind: Literal["layout"] = "layout"
    world_size: int = Field(ge=1, le=MAX_WORLD_SIZE)
    #: Layer names: printable (no control characters), at most ``max_layer_name`` characters (:class:`Limits`).
    layers: list[Annotated[str, Field(min_length=1, max_length=MAX_LAYER_NAME)]] = Field(default_factory=list,
                                                                                          max_length=MAX_LAYERS)
    #: Elements of each layer's full (unsharded) parameter.
    numel: list[Annotated[int, Field(ge=0, lt=MAX_STEP)]] = Field(default_factory=list, max_length=MAX_LAYERS)
    #: Whether each layer is sharded across ranks (FSDP2): then every rank reports its shard.
    sharded: list[bool] = Field(default_factory=list, max_length=MAX_LAYERS)
    #: Output units (rows) of each layer's full parameter; empty when not known.
    units: list[Annotated[int, Field(ge=0, lt=MAX_STEP)]] = Field(default_factory=list, max_length=MAX_LAYERS)
    #: The kind of module that holds each layer's parameter, where it matters to judging ("embedding": an
    #: ``nn.Embedding`` or ``nn.EmbeddingBag`` table, whose rows are tokens), "" otherwise; empty when not known
    #: (older senders). See :mod:`gfservice.training.module_kinds`.
    kinds: list[Annotated[str, Field(pattern=r"^[a-z_]{0,32}$")]] = Field(default_factory=list,
                                                                           max_length=MAX_LAYERS)
    #: False for ranks that send only a heartbeat (DDP ranks other than the reporting one).
    reports_layers: bool = True
    #: The ranks this layout stands for, ``rank`` among them, when a node merge agent sends it for its node's
    #: ranks (see :mod:`gfservice.hosting.merge_agent`); empty: ``rank`` alone.
    ranks: list[Annotated[int, Field(ge=0, lt=MAX_WORLD_SIZE)]] = Field(default_factory=list,
                                                                         max_length=MAX_NODE_RANKS)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Layout:
        limits = _limits(info)
        if self.world_size > limits.max_world_size:
            raise ValueError(f"world size {self.world_size} is over the limit of {limits.max_world_size} "
                             "(max_world_size)")
        if self.rank >= self.world_size:
            raise ValueError(f"rank {self.rank} is outside world size {self.world_size}")
        if self.layers:
            longest = max(map(len, self.layers))
            if longest > limits.max_layer_name:
                raise PydanticCustomError("oversized", "a layer name of {n} characters; the limit is {limit} "
                                          "(max_layer_name)", {"n": longest, "limit": limits.max_layer_name})
            bad = forbidden_char("".join(self.layers))
            if bad is not None:
                raise ValueError(f"layer names must not hold control characters or lone surrogates (found {bad!a})")
        if not (len(self.layers) == len(self.numel) == len(self.sharded)):
            raise ValueError("layers, numel and sharded must have the same length")
        if self.units and len(self.units) != len(self.layers):
            raise ValueError("units must be empty or have one entry per layer")
        if self.kinds and len(self.kinds) != len(self.layers):
            raise ValueError("kinds must be empty or have one entry per layer")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError("layer names must be unique")
        if self.reports_layers and not self.layers:
            raise ValueError("a layout that reports layers needs at least one layer")
        if self.ranks:
            _check_ranks(self.ranks, self.rank)
            if self.ranks[-1] >= self.world_size:
                raise ValueError(f"rank {self.ranks[-1]} is outside world size {self.world_size}")
        return self


class RunEnd(_Message):
    """Sent by a rank when its monitor closes: the run is over for that rank (not stalled)."""

    kind: Literal["end"] = "end"


def _finite_or_none(v: float | None, name: str) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _check_ranks(ranks: list[int], rank: int) -> None:
    if any(b <= a for a, b in itertools.pairwise(ranks)):
        raise ValueError("ranks must be increasing")
    if rank not in ranks:
        raise ValueError(f"ranks must hold the message's own rank {rank}")


class RankValues(BaseModel):
    """A value for some of a node report's ranks: ``values[i]`` is rank ``ranks[i]``'s (every rank where that is
    cheap, the outliers otherwise: see :func:`gfservice.service.merging.compact`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ranks: list[Annotated[int, Field(ge=0, lt=MAX_WORLD_SIZE)]] = Field(max_length=MAX_NODE_RANKS)
    values: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] = Field(max_length=MAX_NODE_RANKS)

    @model_validator(mode="after")
    def _paired(self) -> RankValues:
        if len(self.ranks) != len(self.values):
            raise ValueError("ranks and values must have the same length")
        return self


class NodeRanks(BaseModel):
    """The ranks a node merge agent's :class:`StepReport` covers (its statistics are theirs, merged exactly) and
    what it keeps of each: the ranks whose local gradients held NaN/Inf, and their local norms and step times.

    >>> NodeRanks(ranks=[8, 9], nonfinite=[9], local_norm=RankValues(ranks=[8, 9], values=[1.0, 2.0])).nonfinite
    [9]
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ranks: list[Annotated[int, Field(ge=0, lt=MAX_WORLD_SIZE)]] = Field(min_length=1, max_length=MAX_NODE_RANKS)
    #: The covered ranks whose local gradients held NaN/Inf before they were reduced.
    nonfinite: list[int] = Field(default_factory=list, max_length=MAX_NODE_RANKS)
    local_norm: RankValues | None = None
    step_time: RankValues | None = None
    compute_time: RankValues | None = None

    @model_validator(mode="after")
    def _within(self) -> NodeRanks:
        _check_ranks(self.ranks, self.ranks[0])
        covered = set(self.ranks)
        for part in (self.nonfinite, *(v.ranks for v in (self.local_norm, self.step_time, self.compute_time) if v)):
            if not covered.issuperset(part):
                raise ValueError("per-rank values name ranks the report does not cover")
        return self


#: Float fields that are times or norms: finite and not negative (``loss`` may be NaN: that is news).
_NON_NEGATIVE = frozenset({"time", "local_norm", "step_time", "compute_time"})


#: Why the monitor's guard skipped a step (see :mod:`gfservice.training.guard`).
GuardReason = Literal["nonfinite_gradient", "nonfinite_loss", "gradient_norm", "layer_norm", "learning_rate"]


class StepReport(_Message):
    """One rank's statistics for one collected step, in its layout's layer order.

    ``stats`` holds the per-layer statistics (see :data:`gfservice.stats.STATISTICS`): the core ones, or
    none at all for a heartbeat, plus every statistic of a tier or none of it.
    """

    kind: Literal["step"] = "step"
    step: int = Field(ge=0, lt=MAX_STEP)
    time: float = 0.0
    stats: StatArrays = Field(default_factory=dict)
    loss: float | None = None
    lr: float | None = None
    loss_scale: float | None = None
    #: True when a GradScaler skipped the optimizer step (non-finite gradients at this scale).
    skipped: bool = False
    #: This rank's own global gradient norm before the gradients were reduced across ranks.
    local_norm: float | None = None
    #: Whether this rank's local gradients held NaN/Inf before they were reduced.
    local_nonfinite: bool = False
    #: Seconds since this rank's previous report, per step.
    step_time: float | None = None
    #: Seconds from the end of this rank's previous step until its first gradient bucket was ready (its data
    #: loading, forward and backward: what differs between ranks that wait for each other in the all-reduce).
    compute_time: float | None = None
    #: The optimizer's learning rate and weight decay of each parameter group, as set at this step (see
    #: :mod:`gfservice.training.optim_info`); None when not read.
    group_lr: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(None, max_length=MAX_GROUPS)
    group_wd: list[Annotated[float, Field(ge=0, allow_inf_nan=False)]] | None = Field(None, max_length=MAX_GROUPS)
    #: The parameter group of each layer (-1: in no group), in layout order; sent on deep steps.
    layer_group: list[Annotated[int, Field(ge=-1, lt=MAX_GROUPS)]] | None = Field(None, max_length=MAX_LAYERS)
    #: The low-precision format the gradients are held in, read from the run itself (the parameters' dtype, as
    #: in a ``model.half()`` run): "fp16", "bf16", or None (fp32, or not known).
    precision: Literal["fp16", "bf16"] | None = None
    #: Autocast's low-precision format when autocast was on as the step was collected, else None.
    autocast: Literal["fp16", "bf16"] | None = None
    #: With the monitor's guard on: the steps whose update it skipped so far on this rank, by reason (cumulative;
    #: see :mod:`gfservice.training.guard`). None without a guard.
    guard_skips: dict[GuardReason, Annotated[int, Field(ge=0)]] | None = None
    #: The errors this rank's monitor counted so far (``monitor.errors``, cumulative): failures it kept from the
    #: training loop.
    monitor_errors: int = Field(0, ge=0, lt=MAX_STEP)
    #: Set by a node merge agent: the ranks this report covers, ``rank`` the first of them (None: ``rank`` alone).
    node: NodeRanks | None = None

    @field_validator("time", "lr", "loss_scale", "local_norm", "step_time", "compute_time")
    @classmethod
    def _finite(cls, v: float | None, info: ValidationInfo) -> float | None:
        name = info.field_name or "value"
        _finite_or_none(v, name)
        if v is not None and v < 0 and name in _NON_NEGATIVE:
            raise ValueError(f"{name} must not be negative, got {v}")
        return v

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
        if self.node is not None and self.node.ranks[0] != self.rank:
            raise ValueError(f"a node report's rank {self.rank} must be the first rank it covers")
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
        self._nan_explained()
        if self.layer_group is not None:
            if len(self.layer_group) != n:
                raise ValueError(f"layer_group has {len(self.layer_group)} entries but count has {n}")
            groups = len(self.group_lr or ())
            if self.layer_group and max(self.layer_group) >= groups:
                raise ValueError(f"layer_group names group {max(self.layer_group)}; group_lr has {groups}")
        return self

    def _nan_explained(self) -> None:
        """A NaN sum of a layer (``sum_sq``, ``sum_abs``) needs a NaN/Inf gradient value in that layer: a non-zero
        ``nonfinite`` count or, where it was read, a NaN/Inf ``max_abs`` (what the collector reports for one). +Inf
        sums are allowed
        (a float32 accumulator overflows on huge finite gradients: ``exploding`` reports those), and so are NaN
        weight and update sums (the weights themselves can hold NaN).
        """
        for name in ("sum_sq", "sum_abs"):
            a = self.stats.get(name)
            if a is None or not a.size or not math.isnan(a.sum()):  # one pass; no -Inf here (refused above)
                continue
            unexplained = np.isnan(a) & (self.stats["nonfinite"] == 0)
            peak = self.stats.get("max_abs")
            if peak is not None:
                unexplained &= np.isfinite(peak)
            if unexplained.any():
                i = int(np.flatnonzero(unexplained)[0])
                raise PydanticCustomError("invalid", "{name} is NaN in layer {i} while its nonfinite count is 0 "
                                          "and its max_abs finite or absent", {"name": name, "i": i})

    @property
    def covers(self) -> list[int]:
        """The ranks this report speaks for: ``rank``, or a node report's ranks."""
        return [self.rank] if self.node is None else self.node.ranks

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


def parse(message: Any, limits: LimitsLike | None = None) -> Layout | StepReport | RunEnd:
    """Validate one message (a dict, or a message object: validated the same way, whatever was done to it since
    it was built); raises :class:`Rejected`, and nothing else, whatever ``message`` is.

    ``limits`` (a :class:`Limits`, or the aggregator's ``AggregatorConfig``) bounds layer names and world sizes;
    :data:`DEFAULT_LIMITS` without it.
    """
    try:
        return _parse(message, limits)
    except Rejected:
        raise
    except Exception as exc:  # a hostile object (a mapping whose methods raise, an odd version...) is refused too
        raise Rejected(RejectReason.invalid, f"unreadable message: {type(exc).__name__}") from None


def _show(value: Any) -> str:
    """A short, printable rendering of a value from a message (hostile ones included), for error details."""
    if value is None or isinstance(value, bool | int | float | str):
        text = ascii(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return type(value).__name__


def _parse(message: Any, limits: LimitsLike | None) -> Layout | StepReport | RunEnd:
    data: BaseModel | Mapping[str, Any]
    kind: Any
    version: Any
    if type(message) in (Layout, StepReport, RunEnd):
        data = message
        kind, version = message.kind, message.version
    elif isinstance(message, Layout | StepReport | RunEnd):  # a subclass: only its fields count, as plain data
        data = dict(message)
        kind, version = data.get("kind"), data.get("version", PROTOCOL_VERSION)
    elif isinstance(message, Mapping):
        kind, version, data = message.get("kind"), message.get("version", PROTOCOL_VERSION), message
    else:
        raise Rejected(RejectReason.invalid, f"expected a mapping, got {type(message).__name__}")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise Rejected(RejectReason.unsupported_version,
                       f"protocol version {_show(version)}; this service speaks {PROTOCOL_VERSION}")
    if not isinstance(kind, str) or kind not in _KINDS:
        raise Rejected(RejectReason.unknown_kind, f"kind {_show(kind)}; expected one of {', '.join(_KINDS)}")
    context = limits if limits is not None else DEFAULT_LIMITS
    try:
        if isinstance(data, Layout | StepReport | RunEnd):
            return type(data).model_validate(data, context=context)
        return _MESSAGE.validate_python(data, context=context)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        loc = [str(p) for p in first["loc"]]
        if not isinstance(data, BaseModel) and loc and loc[0] == kind:
            loc = loc[1:]  # the union's tag
        where = f"{kind}.{'.'.join(loc)}" if loc else kind
        oversized = first["type"] in ("oversized", "too_long", "string_too_long")
        reason = RejectReason.oversized if oversized else RejectReason.invalid
        raise Rejected(reason, f"{where}: {first['msg']}") from None
