"""Mergeable per-layer gradient statistics (pure numpy): the one declaration of each statistic.

Each statistic is a field of :class:`GradStats` declared with :func:`statistic`: its dtype, how it merges
across ranks (``sum`` adds, ``max`` takes the maximum, a histogram adds bin by bin) and when it is
collected (``core`` every collected step; ``peak``, the largest |g|, every collected step where it costs no
second read of the gradients (the fused CUDA kernel) and on deep steps everywhere; ``deep`` on deep steps;
``update`` on deep steps that saw the optimizer step). The wire model, the merge, the history file format, the
plugin kit's ``make_step`` and the collector's packing all read :data:`STATISTICS`; adding a statistic is one
field here plus its kernel.
Norms, means, ratios and underflow fractions are derived here, never shipped.

>>> a = GradStats.from_arrays({"w": np.array([3.0, -4.0]), "b": np.array([0.0])}, deep=True)
>>> a.norm.tolist(), a.max_abs.tolist(), a.zeros.tolist()
([5.0, 0.0], [4.0, 0.0], [0, 1])
>>> both = merge_shards([a, a], sharded=np.array([True, False]))
>>> both.count.tolist(), both.sum_sq.tolist()
([4, 1], [50.0, 0.0])
>>> [s.name for s in STATISTICS if s.tier == "core"]
['count', 'sum_sq', 'nonfinite']
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "EXP_BINS",
    "FORMAT_LIMITS",
    "PEAK_BOUND",
    "STATISTICS",
    "GradStats",
    "RankWindow",
    "Statistic",
    "depth_buckets",
    "exponent_histogram",
    "merge_shards",
    "statistic",
]

#: Number of bins of the exponent histogram: one per biased fp32 exponent (0 = zero or fp32 subnormal,
#: 255 = Inf/NaN).
EXP_BINS = 256
FP32_BIAS = 127

#: Smallest normal and smallest subnormal magnitude of each low-precision format, as powers of two.
#: Values below the subnormal limit flush to zero; values below the normal limit lose precision.
FORMAT_LIMITS: dict[str, tuple[int, int]] = {
    "fp16": (-14, -24),
    "bf16": (-126, -133),
    "fp8_e4m3": (-6, -9),
    "fp8_e5m2": (-14, -16),
}

#: Below this L2 norm no element of a layer can reach the largest finite value of any format in
#: :data:`FORMAT_MAX` (``max |g| <= ||g||``): where every layer's norm is below it, a step without ``max_abs``
#: loses nothing a bound on |g| needs. The collector reads the maximum on the other steps.
PEAK_BOUND = 448.0

#: Largest finite magnitude of each low-precision format; larger values overflow to Inf (fp8 e4m3 has no Inf:
#: they become NaN or saturate).
FORMAT_MAX: dict[str, float] = {
    "fp16": 65504.0,
    "bf16": (2 - 2**-7) * 2.0**127,
    "fp8_e4m3": 448.0,
    "fp8_e5m2": 57344.0,
}
__test__: dict[str, str] = {"FORMAT_MAX": """
>>> FORMAT_MAX["fp16"], FORMAT_MAX["fp8_e4m3"], FORMAT_MAX["fp8_e5m2"], f"{FORMAT_MAX['bf16']:.3e}"
(65504.0, 448.0, 57344.0, '3.390e+38')
>>> sorted(FORMAT_MAX) == sorted(FORMAT_LIMITS), PEAK_BOUND == min(FORMAT_MAX.values())
(True, True)
"""}

Tier = Literal["core", "peak", "deep", "update"]
Reduce = Literal["sum", "max"]
Array = npt.NDArray[Any]


@dataclass(frozen=True)
class Statistic:
    """One shipped statistic: its name, dtype, reducer across ranks and shards, and tier."""

    name: str
    dtype: type[np.generic]
    reduce: Reduce
    tier: Tier
    #: Trailing axis length (a histogram's bins); 0 for one value per layer.
    bins: int = 0
    doc: str = ""

    @property
    def ndim(self) -> int:
        return 2 if self.bins else 1

    def empty(self) -> Array:
        """A zero-layer array of this statistic's dtype and shape."""
        return np.zeros((0, self.bins) if self.bins else 0, dtype=self.dtype)


def statistic(dtype: type[np.generic], reduce: Reduce, tier: Tier, doc: str, bins: int = 0) -> Any:
    """Declare a field of :class:`GradStats` as a shipped statistic (core ones are required)."""
    meta = {"statistic": (dtype, reduce, tier, bins, doc)}
    if tier == "core":
        return field(metadata=meta)
    return field(default=None, metadata=meta)


@dataclass(eq=False)
class GradStats:
    """Statistics of the gradients of a list of layers (parameter tensors), one entry per layer.

    Core statistics are always there; ``max_abs`` (tier ``peak``) wherever it was read (CUDA: every step; CPU:
    deep steps, and any step with a non-finite sum or a layer norm of at least :data:`PEAK_BOUND`); ``deep``
    ones only on deep steps, ``update`` ones only on deep steps that saw the optimizer step (otherwise ``None``).
    ``units`` (rows of each parameter, its output units)
    is layout, not a statistic.
    """

    layers: tuple[str, ...]
    count: Array = statistic(np.int64, "sum", "core", "gradient elements (0: no gradient at this step)")
    sum_sq: Array = statistic(np.float64, "sum", "core", "sum of g**2 (Inf or NaN when some g is)")
    nonfinite: Array = statistic(np.int64, "sum", "core", "NaN or Inf elements")
    max_abs: Array | None = statistic(np.float64, "max", "peak", "largest |g|")
    sum_abs: Array | None = statistic(np.float64, "sum", "deep", "sum of |g|")
    zeros: Array | None = statistic(np.int64, "sum", "deep", "exactly zero elements")
    exp_hist: Array | None = statistic(np.int64, "sum", "deep", "histogram of the fp32 exponent of |g|",
                                       bins=EXP_BINS)
    dead_units: Array | None = statistic(np.int64, "sum", "deep",
                                         "output units (rows) whose gradient is exactly zero")
    weight_sq: Array | None = statistic(np.float64, "sum", "update", "sum of w**2 after the optimizer step")
    update_sq: Array | None = statistic(np.float64, "sum", "update", "sum of (w_after - w_before)**2")
    units: Array | None = None

    @classmethod
    def from_arrays(cls, grads: Mapping[str, Array], deep: bool = False) -> GradStats:
        """Reference implementation on host arrays (float64 accumulation); used by tests and tools.

        >>> GradStats.from_arrays({"x": np.array([1.0, np.nan])}).nonfinite.tolist()
        [1]
        >>> GradStats.from_arrays({"w": np.array([[0.0, 0.0], [1.0, 0.0]])}, deep=True).dead_units.tolist()
        [1]
        """
        names = tuple(grads)
        arrs = [np.asarray(g) for g in grads.values()]
        a64 = [np.abs(a.astype(np.float64)).ravel() for a in arrs]
        out = cls(
            layers=names,
            count=np.array([a.size for a in a64], dtype=np.int64),
            sum_sq=np.array([np.sum(a * a) for a in a64], dtype=np.float64),
            max_abs=np.array([a.max(initial=0.0) for a in a64], dtype=np.float64),
            nonfinite=np.array([np.count_nonzero(~np.isfinite(a)) for a in a64], dtype=np.int64),
            units=np.array([unit_rows(a.shape) for a in arrs], dtype=np.int64),
        )
        if deep:
            out.sum_abs = np.array([np.sum(a) for a in a64], dtype=np.float64)
            out.zeros = np.array([np.count_nonzero(a == 0) for a in a64], dtype=np.int64)
            out.exp_hist = np.stack(
                [exponent_histogram(a.astype(np.float32)) for a in arrs]
            ) if arrs else np.zeros((0, EXP_BINS), np.int64)
            out.dead_units = np.array(
                [np.count_nonzero(~np.any(a.reshape(unit_rows(a.shape), -1) != 0, axis=1)) if a.size else 0
                 for a in arrs], dtype=np.int64)
        return out

    @property
    def deep(self) -> bool:
        return self.sum_abs is not None

    def __len__(self) -> int:
        return len(self.layers)

    def arrays(self) -> dict[str, Array]:
        """The statistics that are present, by name (what travels and what a history file holds)."""
        out: dict[str, Array] = {}
        for s in STATISTICS:
            value = getattr(self, s.name)
            if value is not None:
                out[s.name] = value
        return out

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def norm(self) -> Array:
        """L2 norm per layer."""
        return np.sqrt(self.sum_sq)

    @property
    def rms(self) -> Array:
        """Root mean square per layer (0 for empty layers)."""
        return np.sqrt(_safe_div(self.sum_sq, self.count))

    @property
    def nonfinite_layers(self) -> Array:
        """Per layer: holds a NaN/Inf value (a non-zero count, or a NaN/Inf maximum where it was read).

        >>> GradStats.from_arrays({"a": np.array([1.0]), "b": np.array([np.inf])}).nonfinite_layers.tolist()
        [False, True]
        """
        bad: Array = self.nonfinite > 0
        if self.max_abs is not None:
            bad |= ~np.isfinite(self.max_abs)
        return bad

    @property
    def mean_abs(self) -> Array | None:
        """Mean |g| per layer (deep steps only)."""
        return None if self.sum_abs is None else _safe_div(self.sum_abs, self.count)

    @property
    def zero_fraction(self) -> Array | None:
        """Fraction of exactly-zero gradient elements per layer (deep steps only)."""
        return None if self.zeros is None else _safe_div(self.zeros, self.count)

    @property
    def dead_fraction(self) -> Array | None:
        """Fraction of each layer's output units whose gradient is exactly zero (deep steps only)."""
        if self.dead_units is None or self.units is None:
            return None
        return _safe_div(self.dead_units, self.units)

    @property
    def weight_norm(self) -> Array | None:
        """L2 norm of each layer's weights after the optimizer step (deep steps that saw it)."""
        return None if self.weight_sq is None else np.sqrt(self.weight_sq)

    @property
    def update_ratio(self) -> Array | None:
        """|update| / |weights| per layer (NaN for zero weights; deep steps that saw the optimizer step)."""
        if self.update_sq is None or self.weight_sq is None:
            return None
        out = np.full(len(self.update_sq), np.nan)
        np.divide(self.update_sq, self.weight_sq, out=out, where=self.weight_sq > 0)
        ratio: Array = np.sqrt(out)
        return ratio

    @property
    def global_norm(self) -> float:
        """L2 norm over all layers, as an optimizer's clip_grad_norm_ computes it."""
        return float(np.sqrt(self.sum_sq.sum()))

    def underflow_fraction(self, fmt: str, subnormal: bool = False) -> Array | None:
        """Fraction of non-zero finite |g| below ``fmt``'s smallest normal (or subnormal) value.

        ``fmt`` is one of :data:`FORMAT_LIMITS`. Deep steps only.

        >>> s = GradStats.from_arrays({"g": np.array([1.0, 1e-5, 1e-9, 0.0])}, deep=True)
        >>> s.underflow_fraction("fp16").round(3).tolist(), s.underflow_fraction("fp16", True).round(3).tolist()
        ([0.667], [0.333])
        """
        if self.exp_hist is None or self.zeros is None:
            return None
        if fmt not in FORMAT_LIMITS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMAT_LIMITS)}")
        limit = FORMAT_LIMITS[fmt][1 if subnormal else 0]
        # fp32 subnormals all sit in bin 0, so limits below 2**-126 (bf16 subnormals) count that whole bin:
        # an upper bound there.
        below = self.exp_hist[:, : max(limit + FP32_BIAS, 1)].sum(axis=1) - self.zeros
        finite_nonzero = self.exp_hist[:, :255].sum(axis=1) - self.zeros
        return _safe_div(below, finite_nonzero)

    def select(self, index: npt.ArrayLike) -> GradStats:
        """The statistics of a subset of layers, by position."""
        idx = np.asarray(index, dtype=np.int64)
        kw: dict[str, Any] = {f.name: _take(getattr(self, f.name), idx) for f in fields(self) if f.name != "layers"}
        return GradStats(layers=tuple(self.layers[i] for i in idx), **kw)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of arrays (for messages and history files)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _declared() -> tuple[Statistic, ...]:
    out = []
    for f in fields(GradStats):
        if "statistic" in f.metadata:
            dtype, reduce, tier, bins, doc = f.metadata["statistic"]
            out.append(Statistic(f.name, dtype, reduce, tier, bins, doc))
    return tuple(out)


#: Every shipped statistic, in declaration order.
STATISTICS: tuple[Statistic, ...] = _declared()
#: The statistics by name.
BY_NAME: dict[str, Statistic] = {s.name: s for s in STATISTICS}
#: Names of the statistics of each tier.
TIERS: dict[str, tuple[str, ...]] = {t: tuple(s.name for s in STATISTICS if s.tier == t)
                                     for t in ("core", "peak", "deep", "update")}


def unit_rows(shape: Sequence[int]) -> int:
    """Output units of a parameter of ``shape``: its rows (dim 0) for 2-d and larger, its elements for 1-d.

    >>> unit_rows((64, 3, 3, 3)), unit_rows((10,)), unit_rows(())
    (64, 10, 1)
    """
    if len(shape) == 0:
        return 1
    return int(shape[0])


def _take(a: Array | None, idx: Array) -> Array | None:
    return None if a is None else a[idx]


def _safe_div(num: npt.ArrayLike, den: npt.ArrayLike) -> Array:
    n = np.asarray(num, dtype=np.float64)
    d = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast_shapes(n.shape, d.shape), dtype=np.float64)
    np.divide(n, d, out=out, where=d > 0)
    return out


def exponent_histogram(values: npt.ArrayLike) -> Array:
    """Histogram of the biased fp32 exponent of ``values`` (cast to float32), ``EXP_BINS`` bins.

    >>> h = exponent_histogram(np.array([1.0, 2.0, 0.0, np.inf], dtype=np.float32))
    >>> int(h[127]), int(h[128]), int(h[0]), int(h[255])
    (1, 1, 1, 1)
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.int32).ravel()
    return np.bincount((bits >> 23) & 0xFF, minlength=EXP_BINS).astype(np.int64)


def merge_shards(parts: Sequence[GradStats], sharded: npt.ArrayLike) -> GradStats:
    """Merge the statistics that several ranks computed for the same layers.

    ``sharded[i]`` says whether layer ``i`` is split across ranks (FSDP: each rank holds a shard, so each
    statistic reduces by its declared reducer). Replicated layers (DDP, or parameters FSDP does not shard)
    hold the same gradient on every rank and are counted once: the first part's value is kept. A statistic
    is merged only when every part carries it.

    >>> a = GradStats.from_arrays({"w": np.array([1.0, -2.0])})
    >>> b = GradStats.from_arrays({"w": np.array([3.0])})
    >>> m = merge_shards([a, b], sharded=[True])
    >>> m.count.tolist(), m.sum_sq.tolist(), m.max_abs.tolist()
    ([3], [14.0], [3.0])
    """
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    for p in parts[1:]:
        if p.layers != first.layers:
            raise ValueError("parts cover different layers; merge needs one layout")
    if len(parts) == 1:
        return first
    replicated = ~np.asarray(sharded, dtype=bool)
    merged: dict[str, Any] = {}
    for s in STATISTICS:
        arrays = [getattr(p, s.name) for p in parts]
        if any(a is None for a in arrays):
            merged[s.name] = None
            continue
        # accumulated in place: stacking 256 ranks' exponent histograms of 1,000 layers would take half a GiB
        reduced = np.array(arrays[0], copy=True)
        combine = np.add if s.reduce == "sum" else np.maximum
        for a in arrays[1:]:
            combine(reduced, a, out=reduced)
        mask = replicated[:, None] if s.bins else replicated
        merged[s.name] = np.where(mask, arrays[0], reduced)
    return GradStats(layers=first.layers, units=first.units, **merged)


def noise_scale(local_sq: npt.ArrayLike, global_sq: float, per_rank_batch: float = 1) -> tuple[float, float, float]:
    """The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` of one data-parallel step, and its terms.

    McCandlish et al. 2018, "An Empirical Model of Large-Batch Training", appendix A.1: ``W`` ranks each take
    the gradient of a batch of ``b = per_rank_batch`` samples (``local_sq``: each rank's squared local norm
    ``|G_b|^2``, before the all-reduce; NaN entries are ignored) and the all-reduced gradient is that of a batch
    of ``B = W * b`` (``global_sq``: its squared norm ``|G_B|^2``). Since ``E|G_b|^2 = |G|^2 + tr(Sigma) / b``, the
    unbiased two-batch estimates are, with the mean of the local squared norms as ``|G_b|^2``::

        |G|^2     = (B |G_B|^2 - b |G_b|^2) / (B - b)
        tr(Sigma) = (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

    Returns ``(b_simple, grad_sq, trace)``: ``B_simple`` in samples (in per-rank batches with the default
    ``per_rank_batch=1``), the estimate of ``|G|^2`` and that of ``tr(Sigma)`` (per sample). One step's estimates
    are very noisy (``grad_sq`` may come out negative): average each term over steps before dividing, as the
    paper does. All three are NaN with fewer than two finite local norms; ``b_simple`` is NaN unless
    ``grad_sq > 0`` and ``trace >= 0``.

    >>> [round(v, 6) for v in noise_scale([2.0, 2.2, 1.8], 1.2)]    # 3 ranks: B_simple 1.5 per-rank batches
    [1.5, 0.8, 1.2]
    >>> [round(v, 6) for v in noise_scale([2.0, 2.2, 1.8, float("nan")], 1.2, per_rank_batch=32)]
    [48.0, 0.8, 38.4]
    >>> noise_scale([2.0], 1.2)[0]
    nan
    """
    sq = np.asarray(local_sq, dtype=np.float64).ravel()
    sq = sq[np.isfinite(sq)]
    w = len(sq)
    nan = float("nan")
    if w < 2 or not np.isfinite(global_sq):
        return nan, nan, nan
    small = float(sq.mean())
    b = float(per_rank_batch)
    grad_sq = (w * float(global_sq) - small) / (w - 1)
    trace = (small - float(global_sq)) * b * w / (w - 1)
    b_simple = trace / grad_sq if grad_sq > 0 and trace >= 0 else nan
    return b_simple, grad_sq, trace


def depth_buckets(sum_sq: npt.ArrayLike, count: npt.ArrayLike, buckets: int) -> list[float | None]:
    """RMS gradient of ``buckets`` contiguous depth buckets: ``sqrt(sum sum_sq / sum count)`` per bucket.

    Bucket ``b`` covers layers ``[b*n//B, (b+1)*n//B)``; with fewer layers than buckets each bucket holds
    the one layer at its depth, so the picture keeps its shape. A bucket holding NaN/Inf gradients is NaN or
    Inf; one without elements (no gradients at all) is ``None``. The exporter's ``gradflow_depth_rms`` and the
    training-side sinks (``gfservice.training.watch``) draw the same picture with it.

    >>> depth_buckets(np.array([4.0, 0.0, 9.0, 16.0]), np.array([1, 1, 1, 1]), 2)
    [1.4142135623730951, 3.5355339059327378]
    >>> depth_buckets(np.array([4.0, 9.0]), np.array([1, 1]), 4)
    [2.0, 2.0, 3.0, 3.0]
    >>> depth_buckets(np.array([np.nan, 1.0, 0.0]), np.array([1, 1, 0]), 3)
    [nan, 1.0, None]
    """
    sum_sq = np.asarray(sum_sq)
    n = len(sum_sq)
    if n == 0:
        return [None] * buckets
    lo = np.arange(buckets) * n // buckets
    hi = np.maximum((np.arange(buckets) + 1) * n // buckets, lo + 1)
    csq = np.concatenate([[0.0], np.cumsum(sum_sq, dtype=np.float64)])
    ccount = np.concatenate([[0], np.cumsum(count, dtype=np.int64)])
    sq = csq[hi] - csq[lo]
    cnt = ccount[hi] - ccount[lo]
    # Non-finite sums poison the cumulative sums past them: recompute those buckets directly.
    if not np.all(np.isfinite(sum_sq)):
        sq = np.array([np.sum(sum_sq[a:b]) for a, b in zip(lo, hi, strict=True)])
    with np.errstate(divide="ignore", invalid="ignore"):
        rms = np.sqrt(sq / np.maximum(cnt, 1))
    return [float(v) if c > 0 else None for v, c in zip(rms, cnt, strict=True)]


class RankWindow:
    """The last ``size`` steps of one per-rank value, one column per rank seen: the ranks of a step are those
    that reported (``StepStats.rank_ids``), so columns are aligned by rank, NaN where a rank said nothing.

    >>> w = RankWindow(3)
    >>> w.append([0, 2], [1.0, 2.0])
    >>> w.append([2, 5], [3.0, 4.0])
    >>> w.ids.tolist(), w.stack().tolist()
    ([0, 2, 5], [[1.0, 2.0, nan], [nan, 3.0, 4.0]])
    >>> w2 = RankWindow(3)
    >>> w2.load_state_dict(w.state_dict()); w2.stack().shape
    (2, 3)
    """

    def __init__(self, size: int):
        self.size = size
        self.ids: Array = np.zeros(0, np.int64)
        self.rows: deque[Array] = deque(maxlen=size)

    def __len__(self) -> int:
        return len(self.rows)

    def append(self, ranks: npt.ArrayLike, values: npt.ArrayLike) -> None:
        ids = np.asarray(ranks, np.int64)
        if len(ids) != len(self.ids) or not np.array_equal(ids, self.ids):
            union = np.union1d(self.ids, ids)
            if len(union) != len(self.ids):
                where = np.searchsorted(union, self.ids)
                for i, row in enumerate(self.rows):
                    wide = np.full(len(union), np.nan)
                    wide[where] = row
                    self.rows[i] = wide
                self.ids = union
        row = np.full(len(self.ids), np.nan)
        row[np.searchsorted(self.ids, ids)] = np.asarray(values, np.float64)
        self.rows.append(row)

    def stack(self) -> Array:
        """The window as a (steps, ranks) array, oldest step first."""
        return np.stack(self.rows) if self.rows else np.zeros((0, len(self.ids)))

    def clear(self) -> None:
        self.rows.clear()
        self.ids = np.zeros(0, np.int64)

    def state_dict(self) -> dict[str, Any]:
        return {"ids": self.ids.copy(), "rows": [r.copy() for r in self.rows]}

    def load_state_dict(self, state: Mapping[str, Any], rows_key: str = "rows", ids_key: str = "ids") -> None:
        """Restore :meth:`state_dict` (its two entries under ``rows_key``, ``ids_key``), or rows saved without
        ranks (then column ``i`` is rank ``i``)."""
        rows = [np.asarray(r, np.float64) for r in state.get(rows_key, [])]
        self.rows = deque(rows, maxlen=self.size)
        ids = state.get(ids_key)
        self.ids = np.asarray(ids if ids is not None else np.arange(len(rows[-1]) if rows else 0), np.int64)
