"""Gradient statistics on the gradients' device, step after step: which kernels run, and one copy to the host.

The training side's torch code lives here and in :mod:`gfservice.training.kernels` (the reductions per device),
:mod:`gfservice.training.parameters` (which parameters) and :mod:`gfservice.training.ddp_hook`.
Per collected step, every reduction runs as fused multi-tensor kernels on the device and all results
are packed into one float64 vector, copied to the host once. Nothing syncs per parameter. On CUDA the
copy is asynchronous (pinned memory and an event), so the training thread does not wait for it. On CPU a core
step reads the gradients once, for the sums of squares; max |g| is read where it can matter (see
:meth:`GradCollector.make_exact`).

>>> import torch
>>> model = torch.nn.Linear(3, 2)
>>> model(torch.ones(4, 3)).sum().backward()
>>> s = grad_stats(model.named_parameters(), deep=True)
>>> s.layers, s.count.tolist(), s.nonfinite.tolist()
(('weight', 'bias'), [6, 2], [0, 0])
>>> [round(float(v), 4) for v in s.norm]
[9.798, 5.6569]
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from gfservice.stats import BY_NAME, EXP_BINS, PEAK_BOUND, TIERS, GradStats, unit_rows
from gfservice.training.kernels import accumulation_dtype
from gfservice.training.kernels.cpu import SumPlan, core_cpu, sums_cpu
from gfservice.training.kernels.cuda import TRITON
from gfservice.training.kernels.deep import deep_stats, weight_sums
from gfservice.training.parameters import is_dtensor, is_sharded, local_part, select_parameters

log = logging.getLogger(__name__)

_NONE = type(None)


@dataclass
class Collected:
    """What one collected step produced on the host: the statistics and the named extras (loss, ...)."""

    grads: GradStats
    extras: dict[str, float | None]
    #: Whether the statistics are exact already (read before clipping): nothing may read ``.grad`` again.
    exact: bool = False


class Packing(NamedTuple):
    """What one step's packed vector holds, in order, and what :meth:`GradCollector.unpack` needs besides it.

    The vector: sums of squares of the layers in ``have``, their max |g| when ``peak``, the deep statistics of
    those layers and (``with_weights``) the update statistics of every layer when ``deep``, then the extras
    named in ``on_device``.
    """

    #: Positions of the layers with a non-empty gradient at this step, in order.
    have: list[int]
    #: Every layer's element count at this step (0 without a gradient).
    counts: np.ndarray
    peak: bool
    deep: bool
    with_weights: bool
    #: Every extra the caller named, in its order (each comes back, ``None`` when it was ``None``).
    names: list[str]
    #: The extras that travel at the end of the vector (device tensors), in order.
    on_device: list[str]
    #: The extras read on the host already (numbers, CPU tensors).
    host_extras: dict[str, float]
    #: Exact NaN/Inf counts of the layers in ``have``, read before clipping (None: flags from the sums/maxima).
    nonfinite: np.ndarray | None = None
    #: Whether the gradient part is final (read and made exact before clipping): nothing reads ``.grad`` later.
    exact: bool = False
    #: Whether the extra ``grad_scale`` is the loss scale the gradients carried when read (divided out).
    scaled: bool = False
    #: Whether some layer had no gradient or an all-zero one, when known at the read (None: not looked at).
    missing: bool | None = None


class Pending:
    """A device-to-host copy in flight; :meth:`resolve` waits for it (on CPU it is already done)."""

    def __init__(self, host: torch.Tensor, event: torch.cuda.Event | None,
                 unpack: Callable[[np.ndarray, Packing], Collected], packing: Packing):
        self._host = host
        self._event = event
        self._unpack = unpack
        self._packing = packing
        self._result: Collected | None = None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    @property
    def exact(self) -> bool:
        """Whether the gradient part is final already (:attr:`Packing.exact`): nothing needs ``.grad`` again."""
        return self._packing.exact

    def some_layer_without_gradient(self) -> bool:
        """Whether some layer had no gradient or an all-zero one: a frozen layer, or one unfrozen since (a look at
        the host vector, without unpacking it; call once the copy has landed)."""
        packing = self._packing
        if packing.missing is not None:
            return packing.missing
        n = len(packing.have)
        return n < len(packing.counts) or not packing.counts.all() or not self._host[:n].numpy().all()

    def resolve(self) -> Collected:
        if self._result is None:
            if self._event is not None and not self._event.query():  # a landed copy needs no wait (no sync)
                self._event.synchronize()
            self._result = self._unpack(self._host.numpy(), self._packing)
        return self._result


@dataclass
class GradRead:
    """One step's gradients, read at one moment (the end of backward, or ``monitor.step()``): the reductions on
    the gradients' device (not yet copied to the host) and what :meth:`GradCollector.unpack` needs to read them.

    ``vector`` holds the sums of squares of the layers in ``have``, their max |g| when ``peak``, and their deep
    statistics when ``deep``. ``nonfinite``: exact NaN/Inf counts of those layers where they were read (on CPU,
    before clipping); ``scale``: the loss scale the gradients carried (a ``GradScaler``'s, before ``unscale_``),
    divided out on the host.
    """

    vector: torch.Tensor
    have: list[int]
    counts: np.ndarray
    peak: bool
    deep: bool
    nonfinite: np.ndarray | None = None
    exact: bool = False
    scale: torch.Tensor | float | None = None
    #: Whether some layer had no gradient or an all-zero one (set by :meth:`GradCollector.exact`).
    missing: bool | None = None


class GradCollector:
    """Computes the statistics of a fixed list of parameters' gradients, step after step.

    Layers are the selected trainable parameters in the model's order, and the frozen ones named in ``held``
    (``id()`` of parameters an optimizer holds: they may be unfrozen later). A parameter whose gradient is
    ``None`` at a step, or that is frozen (``requires_grad`` False: see :meth:`refresh_live`), reports a count of
    0 at that step. A sparse gradient (``nn.Embedding(sparse=True)``) is read over its coalesced values; its count
    is the parameter's element count, as for a dense one (the untouched rows hold zeros). A complex gradient is
    read as its real and imaginary parts (``torch.view_as_real``): its norm is exact, its count twice its
    element count.
    """

    def __init__(self, named: Iterable[tuple[str, torch.nn.Parameter]], include: Sequence[str] = (),
                 exclude: Sequence[str] = (), held: Collection[int] = ()):
        selected = select_parameters(named, include, exclude, held)
        if not selected:
            raise ValueError("no trainable parameters selected: check the include/exclude patterns")
        self.layers: tuple[str, ...] = tuple(n for n, _ in selected)
        self.params: list[torch.nn.Parameter] = [p for _, p in selected]
        self.numel: list[int] = [int(p.numel()) for p in self.params]
        self.sharded: list[bool] = [is_sharded(p) for p in self.params]
        self.units: list[int] = [unit_rows(p.shape) for p in self.params]
        self._any_dtensor = any(is_dtensor(p) for p in self.params)
        #: ``requires_grad`` of every layer when last looked at (:meth:`refresh_live`).
        self.live: tuple[bool, ...] = self._flags()
        #: Positions of the layers whose gradients came sparse (learned on first sight).
        self._sparse: set[int] = set()
        #: Positions of the layers whose parameters are complex (read as real pairs).
        self._complex = {i for i, p in enumerate(self.params) if p.is_complex()}
        # the fast path of _gradients: plain real tensors, none empty (a gradient has its parameter's shape), all
        # live
        self._dense_plain = (not self._any_dtensor and all(self.numel) and not self._complex
                             and not any(self.sharded))  # a ZeRO partition's gradient is smaller than its parameter
        self._plain = self._dense_plain and all(self.live)
        self._all = list(range(len(self.params)))
        self._counts = np.asarray(self.numel, np.int64)
        self._units = np.asarray(self.units, np.int64)
        self._plan = SumPlan.of(self.params)
        self._before: list[torch.Tensor] | None = None
        device = local_part(self.params[0]).device
        if device.type == "cuda":  # once per process, before the first step
            TRITON.check_once(device)

    def __len__(self) -> int:
        return len(self.layers)

    # ---- the live set of trainable parameters ---------------------------------------------------------
    def _flags(self) -> tuple[bool, ...]:
        return tuple(bool(getattr(p, "requires_grad", True)) for p in self.params)

    def refresh_live(self) -> bool:
        """Read every layer's ``requires_grad`` again; True when some changed (frozen or unfrozen since)."""
        flags = self._flags()
        if flags == self.live:
            return False
        self.live = flags
        self._plain = self._dense_plain and all(flags) and not self._sparse
        return True

    def live_units(self) -> list[int]:
        """Output units of every layer, 0 for the frozen ones: the layout's way to say "not judged"."""
        return [u if on else 0 for u, on in zip(self.units, self.live, strict=True)]

    def frozen(self) -> list[str]:
        """The layers frozen now."""
        return [n for n, on in zip(self.layers, self.live, strict=True) if not on]

    # ---- the optimizer-step hook for update norms -------------------------------------------------
    def snapshot_weights(self) -> None:
        """Keep a copy of the weights (call just before the optimizer step of a deep step)."""
        with torch.no_grad():
            self._before = [_real(local_part(p.detach())).clone() for p in self.params]

    # ---- collection -----------------------------------------------------------------------------
    def launch(self, deep: bool = False, extras: dict[str, torch.Tensor | float | None] | None = None,
               layers: bool = True, peak: bool | None = None) -> Pending:
        """Start the reductions of this step's gradients and their copy to the host.

        ``peak``: read max |g| as well. By default where it costs no second read of the gradients (CUDA) and on
        deep steps; on CPU core steps the sums alone are one read (:func:`~.kernels.cpu.sums_cpu`), and
        :meth:`make_exact` reads the maximum where a bound on |g| could need it. ``extras`` (loss, loss scale, ...:
        name -> tensor or number) ride along in the same copy and come back by name as floats; ``None`` comes back
        as ``None``. With ``layers=False`` only the extras travel (a heartbeat).
        """
        return self.finish(self.read(deep, layers, peak), extras)

    def read(self, deep: bool = False, layers: bool = True, peak: bool | None = None,
             scale: torch.Tensor | float | None = None) -> GradRead:
        """Queue the reductions of the gradients as they are now (see :meth:`launch`); nothing is copied yet.

        ``scale``: the loss scale the gradients carry (read before a ``GradScaler`` unscales them).
        """
        with torch.no_grad():
            try:
                grads, have, counts, plan = self._gradients(layers, dense=deep)
                return self._reduce(grads, have, counts, plan, deep, peak, scale)
            except (RuntimeError, NotImplementedError):
                if not self._learn_sparse():
                    raise
                grads, have, counts, plan = self._gradients(layers, dense=deep)  # now over the sparse values
                return self._reduce(grads, have, counts, plan, deep, peak, scale)

    def _reduce(self, grads: list[torch.Tensor], have: list[int], counts: np.ndarray, plan: SumPlan | None,
                deep: bool, peak: bool | None, scale: torch.Tensor | float | None) -> GradRead:
        device = grads[0].device if grads else local_part(self.params[0]).device
        if peak is None:
            peak = deep or device.type != "cpu"
        pieces = [_core(grads, device, peak, plan)]
        if deep:
            pieces.append(_packed(deep_stats(grads, device), "deep", device))
        vector = torch.cat([p.reshape(-1) for p in pieces]) if len(pieces) > 1 else pieces[0]  # flat already
        if isinstance(scale, torch.Tensor):  # GradScaler updates its scale in place: keep this step's
            scale = scale.detach().clone() if scale.device.type != "cpu" else float(scale)
        return GradRead(vector, have, counts, peak, deep, scale=scale)

    def _learn_sparse(self) -> bool:
        """Note the layers whose gradients are sparse (the fast path cannot read them); False when none is."""
        found = {i for i, p in enumerate(self.params) if p.grad is not None and p.grad.is_sparse}
        if not found or found <= self._sparse:
            return False
        log.info("gfservice: sparse gradients in %s: read over their coalesced values",
                 ", ".join(self.layers[i] for i in sorted(found - self._sparse)))
        self._sparse |= found
        self._plain = False
        return True

    def exact(self, read: GradRead) -> GradRead:
        """``read`` with exact NaN/Inf counts and float64 sums where they are needed, and max |g| where a bound on
        |g| could need it, read from the gradients now (call while they are the ones ``read`` reduced: before
        clipping). CPU only (elsewhere the read is returned as it is). The usual step costs one comparison, as
        :meth:`make_exact`."""
        n = len(read.have)
        if read.vector.device.type != "cpu" or not n:
            return read
        s = 1.0 if read.scale is None else float(read.scale)
        sums = read.vector[:n].numpy()
        read.missing = n < len(self.params) or not sums.min() > 0  # with the data at hand (NaN: True, harmless)
        if sums.max() < (PEAK_BOUND * s) ** 2:  # NaN/Inf fail the comparison
            read.exact = True
            return read
        if not read.peak:  # rare: read again, with the maxima
            redo = self.read(read.deep, True, peak=True, scale=read.scale)
            if redo.have != read.have:
                return read
            read = redo
            sums = read.vector[:n].numpy()
        maxes = read.vector[n: 2 * n].numpy()
        counts = np.zeros(n, np.int64)
        with torch.no_grad():
            for j in np.flatnonzero(~np.isfinite(maxes)):
                counts[j] = int((~torch.isfinite(self._values(read.have[j]))).sum())
            for j in np.flatnonzero(~np.isfinite(sums) & np.isfinite(maxes)):  # a float32 sum that overflowed
                sums[j] = float(torch.linalg.vector_norm(self._values(read.have[j]), dtype=torch.float64)) ** 2
        read.nonfinite = counts
        read.exact = True
        return read

    def finish(self, read: GradRead, extras: dict[str, torch.Tensor | float | None] | None = None) -> Pending:
        """Pack ``read`` with the update statistics of a deep step that saw the optimizer step (weights now
        against the snapshot) and ``extras``; start the one copy to the host."""
        extras = dict(extras or {})
        if read.scale is not None:
            extras["grad_scale"] = read.scale
        device = read.vector.device
        with torch.no_grad():
            pieces = [read.vector]
            before = self._before
            with_weights = read.deep and before is not None
            if read.deep and before is not None:
                weights = [_real(local_part(p.detach())) for p in self.params]
                pieces.append(_packed(weight_sums(weights, before, device), "update", device))
            self._before = None
            present = {k: v for k, v in extras.items() if v is not None}
            # numbers and CPU tensors are read here (no copy); device tensors ride in the one copy to the host
            on_device = {k: v for k, v in present.items()
                         if isinstance(v, torch.Tensor) and v.device.type != "cpu"} if device.type != "cpu" else {}
            host_extras = _host_floats({k: v for k, v in present.items() if k not in on_device})
            if on_device:
                pieces.append(_extras(list(on_device.values()), device))
            packed = torch.cat([p.reshape(-1) for p in pieces]) if len(pieces) > 1 else pieces[0]
            host, event = _to_host(packed)
        names = list(extras)
        return Pending(host, event, self.unpack,
                       Packing(read.have, read.counts, read.peak, read.deep, with_weights, names, list(on_device),
                               host_extras, read.nonfinite, read.exact, read.scale is not None, read.missing))

    def _values(self, i: int) -> torch.Tensor:
        """Layer ``i``'s gradient as this process holds it: a shard's local part, a sparse one's values."""
        grad = self.params[i].grad
        assert grad is not None
        g = local_part(grad)
        return _real(g.coalesce().values() if g.is_sparse else g)

    def _gradients(self, layers: bool, dense: bool = False) -> tuple[list[torch.Tensor], list[int], np.ndarray,
                                                                       SumPlan | None]:
        """This step's non-empty gradients of the live layers, their positions, every layer's count, and how
        :func:`~.kernels.cpu.sums_cpu` reads them when known (:class:`~.kernels.cpu.SumPlan`). The usual step,
        every layer live with its dense gradient, takes no per-layer Python work beyond reading ``.grad``.
        Sparse gradients come as their coalesced values, or (``dense``: deep steps) densified."""
        if not layers:
            return [], [], np.zeros(len(self.params), np.int64), None
        # no detach needed: nothing below records autograd history (no_grad)
        grads: list[Any] = [p.grad for p in self.params]
        if self._plain and _NONE not in map(type, grads):  # no gradient is None (a C-level scan)
            return grads, self._all, self._counts.copy(), self._plan
        kept, have = [], []
        counts = np.zeros(len(self.params), np.int64)
        local = local_part if self._any_dtensor else None
        sparse, live = self._sparse, self.live
        for i, g in enumerate(grads):
            if g is not None and live[i]:
                if local is not None:
                    g = local(g)
                n = g.numel()
                if i in sparse and g.is_sparse:
                    g = g.to_dense() if dense else g.coalesce().values()
                if g.is_complex():
                    g, n = _real(g), 2 * n
                if n:
                    kept.append(g)
                    have.append(i)
                    counts[i] = n
        return kept, have, counts, None

    def unpack(self, a: np.ndarray, packing: Packing) -> Collected:
        """This step's statistics and extras from its packed vector ``a`` on the host (see :class:`Packing`)."""
        have, counts, peak, deep, with_weights, names, present, host_extras = packing[:8]
        L, n = len(self.params), len(have)

        def scatter(v: np.ndarray, dtype: type = np.float64) -> np.ndarray:
            if n == L:  # every layer has a gradient (the usual case)
                return v if v.dtype == dtype else v.astype(dtype)  # a view of this step's own buffer
            out: np.ndarray = np.zeros(L, dtype)
            out[have] = v
            return out

        pos = 0

        def take(k: int) -> np.ndarray:
            nonlocal pos
            v = a[pos: pos + k]
            pos += k
            return v

        sums = take(n)
        max_abs = take(n) if peak else None
        # max |g| is NaN/Inf exactly when some element is; a norm that overflowed its float32 accumulator
        # with a finite maximum is a huge gradient, not a non-finite one (see fix_overflow). Without the
        # maximum the sum flags the layer (NaN/Inf values make it NaN/Inf) and make_exact counts.
        bad = packing.nonfinite if packing.nonfinite is not None else \
            (~np.isfinite(max_abs if max_abs is not None else sums)).astype(np.int64)
        stats = GradStats(
            layers=self.layers,
            count=counts,
            sum_sq=scatter(sums),
            max_abs=None if max_abs is None else scatter(max_abs),
            nonfinite=scatter(bad, np.int64),
            units=self._units.copy(),
        )
        # deep and update statistics come packed in their tier's declaration order (see _packed)
        for tier, rows, present_rows in (("deep", n, have), ("update", L, None)):
            if not deep or (tier == "update" and not with_weights):
                continue
            for name in TIERS[tier]:
                s = BY_NAME[name]
                v = take(rows * max(s.bins, 1)).reshape((rows, s.bins) if s.bins else rows).astype(s.dtype)
                if present_rows is None or rows == L:
                    setattr(stats, name, v)
                else:  # layers without a gradient at this step hold zeros
                    full = np.zeros((L, s.bins) if s.bins else L, s.dtype)
                    full[present_rows] = v
                    setattr(stats, name, full)
        if present:
            host_extras = {**host_extras, **dict(zip(present, (float(v) for v in take(len(present))), strict=True))}
        extras = {k: host_extras.get(k) for k in names}
        if packing.scaled:
            unscale(stats, extras.get("grad_scale"))
        return Collected(stats, extras, packing.exact)

    def fix_overflow(self, stats: GradStats) -> None:
        """Recompute in float64 the sums of squares that overflowed float32 while every value was finite.

        Runs only for such layers (a rare event) and only while this step's gradients are still there.
        """
        bad = np.flatnonzero(~np.isfinite(stats.sum_sq) & (stats.nonfinite == 0))
        with torch.no_grad():
            for i in bad:
                if self.params[i].grad is not None:
                    stats.sum_sq[i] = float(torch.linalg.vector_norm(self._values(int(i)), dtype=torch.float64)) ** 2

    def make_exact(self, stats: GradStats) -> None:
        """Exact NaN/Inf counts and float64 sums for the rare layers that need them, and max |g| where a step
        without it could hide a value a bound on |g| needs (gradients still there).

        The maximum is read when some layer holds NaN/Inf or has a norm of at least
        :data:`~gfservice.stats.PEAK_BOUND` (``max |g| <= ||g||``: below it no value reaches any format's bound).
        The usual step costs one comparison: every sum finite and below the bound (a NaN/Inf value makes its
        layer's sum NaN/Inf) leaves nothing to count, mend or read.
        """
        if not stats.sum_sq.size or stats.sum_sq.max() < PEAK_BOUND ** 2:  # NaN/Inf fail the comparison
            return
        if stats.nonfinite.any():
            self.count_nonfinite(stats)
        if not np.all(np.isfinite(stats.sum_sq)):
            self.fix_overflow(stats)
        if stats.max_abs is None:
            stats.max_abs = self.peaks()

    def peaks(self) -> np.ndarray:
        """max |g| of every layer now (0 without a gradient; NaN where a value is NaN), float64."""
        out = np.zeros(len(self.params), np.float64)
        grads, have, _, _ = self._gradients(True)
        with torch.no_grad():
            for i, g in zip(have, grads, strict=True):
                lo, hi = torch.aminmax(g)
                out[i] = float(torch.maximum(hi, lo.neg()))  # NaN propagates
        return out

    def count_nonfinite(self, stats: GradStats) -> None:
        """Replace the per-layer non-finite flags of ``stats`` by exact counts.

        Runs only for flagged layers (a rare event) and only while this step's gradients are still there.
        """
        with torch.no_grad():
            for i in np.flatnonzero(stats.nonfinite):
                if self.params[i].grad is not None:
                    stats.nonfinite[i] = int((~torch.isfinite(self._values(int(i)))).sum())


def unscale(stats: GradStats, scale: float | None) -> None:
    """Divide the loss scale ``scale`` the gradients carried out of ``stats``: sums of squares by its square, max |g|
    and sum |g| by it, the exponent histogram moved down by its exponent (exact for a power of two, as a
    ``GradScaler``'s scale is; values moved below the normal range land in bin 0). Counts are unchanged.

    >>> s = GradStats.from_arrays({"w": np.array([4.0, -8.0])}, deep=True)
    >>> unscale(s, 4.0); s.sum_sq.tolist(), s.max_abs.tolist(), s.sum_abs.tolist()
    ([5.0], [2.0], [3.0])
    >>> np.flatnonzero(s.exp_hist[0]).tolist()    # 1.0 and -2.0: biased exponents 127 and 128
    [127, 128]
    """
    if scale is None or not np.isfinite(scale) or scale <= 0 or scale == 1.0:
        return
    stats.sum_sq = stats.sum_sq / (scale * scale)
    if stats.max_abs is not None:
        stats.max_abs = stats.max_abs / scale
    if stats.sum_abs is not None:
        stats.sum_abs = stats.sum_abs / scale
    if stats.exp_hist is not None:
        k = round(math.log2(scale))
        h = stats.exp_hist
        moved = np.zeros_like(h)
        moved[:, 0] = h[:, 0]  # zeros and subnormals stay
        moved[:, EXP_BINS - 1] = h[:, EXP_BINS - 1]  # NaN/Inf stay
        target = np.clip(np.arange(1, EXP_BINS - 1) - k, 0, EXP_BINS - 1)
        np.add.at(moved.T, target, h[:, 1: EXP_BINS - 1].T)
        stats.exp_hist = moved


def _real(t: torch.Tensor) -> torch.Tensor:
    """``t``, a complex one as its real and imaginary parts (a view): norms of it are exact.

    >>> _real(torch.tensor([3 + 4j])).norm().item()
    5.0
    """
    return torch.view_as_real(t) if t.is_complex() else t


def _core(grads: list[torch.Tensor], device: torch.device, peak: bool = True,
          plan: SumPlan | None = None) -> torch.Tensor:
    """Per-layer sums of squares then, with ``peak``, max |g|: float64, flat ((2 if peak else 1) * n,), on
    ``device``: the kernel of the device (:mod:`gfservice.training.kernels`)."""
    if not grads:
        return torch.zeros(0, dtype=torch.float64, device=device)
    if device.type == "cpu" and not peak:
        return sums_cpu(grads, plan)
    if device.type == "cuda":
        fused = TRITON(grads)
        if fused is not None:
            return fused
    if device.type == "cpu":
        return core_cpu(grads)
    # any other device, or CUDA without Triton: two multi-tensor kernels over all layers
    sq = torch.stack(torch._foreach_norm(grads, 2, dtype=accumulation_dtype(grads))).double().square()
    if not peak:
        return sq
    maxes = torch.stack(torch._foreach_norm(grads, float("inf"))).double()
    return torch.cat([sq, maxes])


def _packed(values: dict[str, torch.Tensor], tier: str, device: torch.device) -> torch.Tensor:
    """The kernels' results for the statistics of ``tier``, float64, flat, in their declaration order
    (:data:`gfservice.stats.TIERS`): the one place that orders what :meth:`GradCollector.unpack` reads back."""
    names = TIERS[tier]
    if set(values) != set(names):
        raise RuntimeError(f"the {tier} kernels give {sorted(values)}, the schema declares {list(names)}")
    if not names:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.cat([values[k].double().reshape(-1).to(device) for k in names])


def _host_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Loss, scale ... of CPU tensors or numbers as floats, by name (a tensor's first element)."""
    return {k: _host_float(v) for k, v in values.items()}


def _host_float(v: torch.Tensor | float) -> float:
    if not isinstance(v, torch.Tensor):
        return float(v)
    v = local_part(v).detach()
    return v.item() if v.numel() == 1 else float(v.reshape(-1)[0])


def _extras(values: Sequence[torch.Tensor | float], device: torch.device) -> torch.Tensor:
    """Loss, scale ... as one float64 vector on ``device`` (one copy with the rest)."""
    items = []
    for v in values:
        if isinstance(v, torch.Tensor):
            items.append(local_part(v.detach()).reshape(-1)[:1].double().to(device))
        else:
            items.append(torch.tensor([float(v)], dtype=torch.float64, device=device))
    return torch.cat(items)


def _to_host(packed: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """``packed`` on the host: itself on CPU, else a pinned copy under way and the event that marks its end."""
    if packed.device.type == "cpu":
        return packed, None
    host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def grad_stats(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], deep: bool = False,
               include: Sequence[str] = (), exclude: Sequence[str] = ()) -> GradStats:
    """Statistics of the current gradients of ``named_parameters`` (library use, no service).

    ``nonfinite`` holds exact counts here, and ``max_abs`` is always read.
    """
    collector = GradCollector(named_parameters, include, exclude)
    stats = collector.launch(deep=deep, peak=True).resolve().grads
    collector.make_exact(stats)
    return stats
