"""Mergeable per-layer gradient statistics (pure numpy).

A worker ships only sufficient statistics that merge exactly across ranks and shards:
``count``, ``sum_sq``, ``max_abs``, ``nonfinite`` every collected step and, on deep steps,
``sum_abs``, ``zeros`` and a histogram of the fp32 exponent of |g|. Norms, means and
underflow fractions are derived here, never shipped.

>>> a = GradStats.from_arrays({"w": np.array([3.0, -4.0]), "b": np.array([0.0])}, deep=True)
>>> a.norm.tolist(), a.max_abs.tolist(), a.zeros.tolist()
([5.0, 0.0], [4.0, 0.0], [0, 1])
>>> both = merge_shards([a, a], sharded=np.array([True, False]))
>>> both.count.tolist(), both.sum_sq.tolist()
([4, 1], [50.0, 0.0])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields

import numpy as np

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

CORE_FIELDS = ("count", "sum_sq", "max_abs", "nonfinite")
DEEP_FIELDS = ("sum_abs", "zeros", "exp_hist")


@dataclass(eq=False)
class GradStats:
    """Statistics of the gradients of a list of layers (parameter tensors), one entry per layer.

    ``sum_abs``, ``zeros`` and ``exp_hist`` are ``None`` except on deep steps.
    """

    layers: tuple[str, ...]
    count: np.ndarray  # int64, elements per layer
    sum_sq: np.ndarray  # float64, sum of g**2 over finite elements (or Inf/NaN if any is not)
    max_abs: np.ndarray  # float64
    nonfinite: np.ndarray  # int64, NaN or Inf elements
    sum_abs: np.ndarray | None = None  # float64
    zeros: np.ndarray | None = None  # int64, exact zeros
    exp_hist: np.ndarray | None = field(default=None)  # int64 (layers, EXP_BINS)

    @classmethod
    def from_arrays(cls, grads: Mapping[str, np.ndarray], deep: bool = False) -> GradStats:
        """Reference implementation on host arrays (float64 accumulation); used by tests and tools.

        >>> GradStats.from_arrays({"x": np.array([1.0, np.nan])}).nonfinite.tolist()
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
        )
        if deep:
            out.sum_abs = np.array([np.sum(a) for a in a64], dtype=np.float64)
            out.zeros = np.array([np.count_nonzero(a == 0) for a in a64], dtype=np.int64)
            out.exp_hist = np.stack(
                [exponent_histogram(a.astype(np.float32)) for a in arrs]
            ) if arrs else np.zeros((0, EXP_BINS), np.int64)
        return out

    @property
    def deep(self) -> bool:
        return self.sum_abs is not None

    def __len__(self) -> int:
        return len(self.layers)

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def norm(self) -> np.ndarray:
        """L2 norm per layer."""
        return np.sqrt(self.sum_sq)

    @property
    def rms(self) -> np.ndarray:
        """Root mean square per layer (0 for empty layers)."""
        return np.sqrt(_safe_div(self.sum_sq, self.count))

    @property
    def mean_abs(self) -> np.ndarray | None:
        """Mean |g| per layer (deep steps only)."""
        return None if self.sum_abs is None else _safe_div(self.sum_abs, self.count)

    @property
    def zero_fraction(self) -> np.ndarray | None:
        """Fraction of exactly-zero gradient elements per layer (deep steps only)."""
        return None if self.zeros is None else _safe_div(self.zeros, self.count)

    @property
    def global_norm(self) -> float:
        """L2 norm over all layers, as an optimizer's clip_grad_norm_ computes it."""
        return float(np.sqrt(self.sum_sq.sum()))

    def underflow_fraction(self, fmt: str, subnormal: bool = False) -> np.ndarray | None:
        """Fraction of non-zero finite |g| below ``fmt``'s smallest normal (or subnormal) value.

        ``fmt`` is one of :data:`FORMAT_LIMITS`. Deep steps only.

        >>> s = GradStats.from_arrays({"g": np.array([1.0, 1e-5, 1e-9, 0.0])}, deep=True)
        >>> s.underflow_fraction("fp16").round(3).tolist(), s.underflow_fraction("fp16", True).round(3).tolist()
        ([0.667], [0.333])
        """
        if self.exp_hist is None:
            return None
        if fmt not in FORMAT_LIMITS:
            raise ValueError(f"unknown format {fmt!r}; choose one of {sorted(FORMAT_LIMITS)}")
        limit = FORMAT_LIMITS[fmt][1 if subnormal else 0]
        # fp32 subnormals all sit in bin 0, so limits below 2**-126 (bf16 subnormals) count that whole bin:
        # an upper bound there.
        below = self.exp_hist[:, : max(limit + FP32_BIAS, 1)].sum(axis=1) - self.zeros
        finite_nonzero = self.exp_hist[:, :255].sum(axis=1) - self.zeros
        return _safe_div(below, finite_nonzero)

    def select(self, index: np.ndarray | Sequence[int]) -> GradStats:
        """The statistics of a subset of layers, by position."""
        idx = np.asarray(index, dtype=np.int64)
        kw = {f.name: _take(getattr(self, f.name), idx) for f in fields(self) if f.name != "layers"}
        return GradStats(layers=tuple(self.layers[i] for i in idx), **kw)

    def to_dict(self) -> dict:
        """Plain dict of arrays (for pickling, messages and history files)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _take(a: np.ndarray | None, idx: np.ndarray) -> np.ndarray | None:
    return None if a is None else a[idx]


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape), dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def exponent_histogram(values: np.ndarray) -> np.ndarray:
    """Histogram of the biased fp32 exponent of ``values`` (cast to float32), ``EXP_BINS`` bins.

    >>> h = exponent_histogram(np.array([1.0, 2.0, 0.0, np.inf], dtype=np.float32))
    >>> int(h[127]), int(h[128]), int(h[0]), int(h[255])
    (1, 1, 1, 1)
    """
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.int32).ravel()
    return np.bincount((bits >> 23) & 0xFF, minlength=EXP_BINS).astype(np.int64)


def merge_shards(parts: Sequence[GradStats], sharded: np.ndarray) -> GradStats:
    """Merge the statistics that several ranks computed for the same layers.

    ``sharded[i]`` says whether layer ``i`` is split across ranks (FSDP: each rank holds a shard,
    so sums add, maxima take the max, histograms add). Replicated layers (DDP, or parameters FSDP
    does not shard) hold the same gradient on every rank and are counted once: the first part's
    value is kept. Deep fields are merged only when every part carries them.
    """
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    for p in parts[1:]:
        if p.layers != first.layers:
            raise ValueError("parts cover different layers; merge needs one layout")
    if len(parts) == 1:
        return first
    sharded = np.asarray(sharded, dtype=bool)
    rep = ~sharded

    def combine(name: str, reduce) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        if any(a is None for a in arrays):
            return None
        merged = reduce(np.stack(arrays), axis=0)
        mask = rep if merged.ndim == 1 else rep[:, None]
        return np.where(mask, arrays[0], merged)

    return GradStats(
        layers=first.layers,
        count=combine("count", np.sum),
        sum_sq=combine("sum_sq", np.sum),
        max_abs=combine("max_abs", np.max),
        nonfinite=combine("nonfinite", np.sum),
        sum_abs=combine("sum_abs", np.sum),
        zeros=combine("zeros", np.sum),
        exp_hist=combine("exp_hist", np.sum),
    )

