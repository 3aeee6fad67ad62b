"""Gradient statistics on the gradients' device: the only torch code in gfservice.

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

import fnmatch
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gfservice.stats import BY_NAME, EXP_BINS, PEAK_BOUND, TIERS, GradStats, unit_rows

try:  # DTensor (FSDP2 parameters and gradients)
    from torch.distributed.tensor import DTensor, Shard
except Exception:  # pragma: no cover - very old torch or no distributed build
    DTensor = None  # type: ignore[misc,assignment]
    Shard = None  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

#: Prefixes that wrappers put in front of parameter names: DDP, torch.compile, FSDP1, checkpointing.
_WRAPPER_PREFIX = re.compile(r"(?:^|(?<=\.))(?:module|_orig_mod|_fsdp_wrapped_module|_checkpoint_wrapped_module)\.")


def clean_name(name: str) -> str:
    """A parameter name without the prefixes that wrappers add.

    >>> clean_name("module._orig_mod.encoder.0.weight")
    'encoder.0.weight'
    >>> clean_name("encoder.module_list.0.bias")
    'encoder.module_list.0.bias'
    """
    return _WRAPPER_PREFIX.sub("", name)


def select_parameters(
    named: Iterable[tuple[str, torch.nn.Parameter]],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters whose cleaned name matches an ``include`` glob (all when empty) and no ``exclude``.

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    >>> [n for n, _ in select_parameters(m.named_parameters(), exclude=["*.bias"])]
    ['0.weight', '1.weight']
    """
    out = []
    for name, p in named:
        if not p.requires_grad:
            continue
        n = clean_name(name)
        if include and not any(fnmatch.fnmatchcase(n, pat) for pat in include):
            continue
        if any(fnmatch.fnmatchcase(n, pat) for pat in exclude):
            continue
        out.append((n, p))
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds (a DTensor's local shard)."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def is_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor split across ranks (any ``Shard`` placement), or says it is a shard
    (``gfservice_sharded``: the DeepSpeed ZeRO partitions of :mod:`gfservice.integrations.deepspeed`)."""
    if getattr(p, "gfservice_sharded", False):
        return True
    return DTensor is not None and isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements)


@dataclass
class Collected:
    """What one collected step produced on the host: the statistics and the named extras (loss, ...)."""

    grads: GradStats
    extras: dict[str, float | None]


class Pending:
    """A device-to-host copy in flight; :meth:`resolve` waits for it (on CPU it is already done)."""

    def __init__(self, host: torch.Tensor, event, unpack):
        self._host = host
        self._event = event
        self._unpack = unpack
        self._result: Collected | None = None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def resolve(self) -> Collected:
        if self._result is None:
            if self._event is not None and not self._event.query():  # a landed copy needs no wait (no sync)
                self._event.synchronize()
            self._result = self._unpack(self._host.numpy())
        return self._result


class GradCollector:
    """Computes the statistics of a fixed list of parameters' gradients, step after step.

    Layers are the selected trainable parameters in the model's order. A parameter whose gradient is
    ``None`` at a step reports a count of 0 at that step.
    """

    def __init__(self, named: Iterable[tuple[str, torch.nn.Parameter]], include=(), exclude=()):
        selected = select_parameters(named, include, exclude)
        if not selected:
            raise ValueError("no trainable parameters selected: check the include/exclude patterns")
        self.layers: tuple[str, ...] = tuple(n for n, _ in selected)
        self.params: list[torch.nn.Parameter] = [p for _, p in selected]
        self.numel: list[int] = [int(p.numel()) for p in self.params]
        self.sharded: list[bool] = [is_sharded(p) for p in self.params]
        self.units: list[int] = [unit_rows(p.shape) for p in self.params]
        self._any_dtensor = DTensor is not None and any(isinstance(p, DTensor) for p in self.params)
        # the fast path of _gradients: plain tensors, none empty (a gradient has its parameter's shape)
        self._plain = not self._any_dtensor and all(self.numel)
        self._all = list(range(len(self.params)))
        self._counts = np.asarray(self.numel, np.int64)
        self._units = np.asarray(self.units, np.int64)
        self._plan = SumPlan.of(self.params)
        self._before: list[torch.Tensor] | None = None
        device = _local(self.params[0]).device
        if device.type == "cuda" and "checked" not in _triton_state:  # once per process, before the first step
            _triton_state["checked"] = triton_self_check(device)

    def __len__(self) -> int:
        return len(self.layers)

    # ---- the optimizer-step hook for update norms -------------------------------------------------
    def snapshot_weights(self) -> None:
        """Keep a copy of the weights (call just before the optimizer step of a deep step)."""
        with torch.no_grad():
            self._before = [_local(p.detach()).clone() for p in self.params]

    # ---- collection -----------------------------------------------------------------------------
    def launch(self, deep: bool = False, extras: dict[str, torch.Tensor | float | None] | None = None,
               layers: bool = True, peak: bool | None = None) -> Pending:
        """Start the reductions of this step's gradients and their copy to the host.

        ``peak``: read max |g| as well. By default where it costs no second read of the gradients (CUDA) and on
        deep steps; on CPU core steps the sums alone are one read (:func:`_sums_cpu`), and :meth:`make_exact`
        reads the maximum where a bound on |g| could need it. ``extras`` (loss, loss scale, ...: name -> tensor or
        number) ride along in the same copy and come back
        by name as floats; ``None`` comes back as ``None``. With ``layers=False`` only the extras travel (a
        heartbeat).
        """
        extras = extras or {}
        with torch.no_grad():
            grads, have, counts, plan = self._gradients(layers)
            device = grads[0].device if grads else self.params[0].device
            if peak is None:
                peak = deep or device.type != "cpu"
            pieces = [_core(grads, device, peak, plan)]
            before = self._before
            with_weights = deep and before is not None
            if deep:
                pieces.append(_packed(_deep(grads, device), "deep", device))
                if before is not None:
                    weights = [_local(p.detach()) for p in self.params]
                    pieces.append(_packed(_weight_sums(weights, before, device), "update", device))
            self._before = None
            present = {k: v for k, v in extras.items() if v is not None}
            # numbers and CPU tensors are read here (no copy); device tensors ride in the one copy to the host
            on_device = {k: v for k, v in present.items()
                         if isinstance(v, torch.Tensor) and v.device.type != "cpu"} if device.type != "cpu" else {}
            host_extras = _host_floats({k: v for k, v in present.items() if k not in on_device})
            if on_device:
                pieces.append(_extras(list(on_device.values()), device))
            packed = torch.cat([p.reshape(-1) for p in pieces]) if len(pieces) > 1 else pieces[0]  # flat already
            host, event = _to_host(packed)
        names = list(extras)
        return Pending(host, event, lambda a: self._unpack(a, have, counts, peak, deep, with_weights, names,
                                                             list(on_device), host_extras))

    def _gradients(self, layers: bool) -> tuple[list[torch.Tensor], list[int], np.ndarray, SumPlan | None]:
        """This step's non-empty gradients, their layers' positions, every layer's count, and how
        :func:`_sums_cpu` reads them when known (:class:`SumPlan`). The usual step, every layer with its
        gradient, takes no per-layer Python work beyond reading ``.grad``."""
        if not layers:
            return [], [], np.zeros(len(self.params), np.int64), None
        # no detach needed: nothing below records autograd history (no_grad)
        grads: list[Any] = [p.grad for p in self.params]
        if self._plain and not any(g is None for g in grads):
            return grads, self._all, self._counts.copy(), self._plan
        kept, have = [], []
        counts = np.zeros(len(self.params), np.int64)
        local = _local if self._any_dtensor else None
        for i, g in enumerate(grads):
            if g is not None:
                if local is not None:
                    g = local(g)
                n = g.numel()
                if n:
                    kept.append(g)
                    have.append(i)
                    counts[i] = n
        return kept, have, counts, None

    def _unpack(self, a: np.ndarray, have: list[int], counts: np.ndarray, peak: bool, deep: bool,
                with_weights: bool, names: list[str], present: list[str], host_extras: dict[str, float]) -> Collected:
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
        flagged = ~np.isfinite(max_abs if max_abs is not None else sums)
        stats = GradStats(
            layers=self.layers,
            count=counts,
            sum_sq=scatter(sums),
            max_abs=None if max_abs is None else scatter(max_abs),
            nonfinite=scatter(flagged.astype(np.int64), np.int64),
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
        return Collected(stats, {k: host_extras.get(k) for k in names})

    def fix_overflow(self, stats: GradStats) -> None:
        """Recompute in float64 the sums of squares that overflowed float32 while every value was finite.

        Runs only for such layers (a rare event) and only while this step's gradients are still there.
        """
        bad = np.flatnonzero(~np.isfinite(stats.sum_sq) & (stats.nonfinite == 0))
        with torch.no_grad():
            for i in bad:
                g = self.params[i].grad
                if g is not None:
                    stats.sum_sq[i] = float(torch.linalg.vector_norm(_local(g), dtype=torch.float64)) ** 2

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
                g = self.params[i].grad
                if g is not None:
                    stats.nonfinite[i] = int((~torch.isfinite(_local(g))).sum())


#: On CPU, tensors up to this many elements go through the multi-tensor (``_foreach``) kernels, whose per-call
#: overhead is shared; larger ones get one BLAS ``dot`` and one ``aminmax`` each (see :func:`_core_cpu`).
_SMALL = 1 << 16
#: Large CPU tensors are read in chunks of this many elements (1 MiB of float32): ``dot`` then ``aminmax`` per
#: chunk, the second pass from the cache (measured 1.6-1.7x the one-norm floor against 2.0x unchunked, 1 thread).
_CHUNK = 1 << 18
#: Chunk of a sum-only read of a large tensor (:func:`_sums_cpu`): 4 MiB of float32, float64 between chunks.
_SUM_CHUNK = 1 << 20
#: Gradients up to this many elements (biases, norms, small embeddings) are summed together by
#: :func:`_sums_cpu`: one copy into a float64 buffer and one segmented sum, where a kernel each costs 4-10 µs
#: of dispatch (measured on the 303 tensors of ``benchmarks/peers.py``'s transformer: 0.92x the one-norm floor
#: at 4,096, 1.2x at 8,192 as the copy outgrows the dispatch it saves, 1.22x with one ``_foreach_norm``).
_TINY = 4096


def _acc(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """Accumulation dtype of the norms: float32, or float64 when a tensor is float64 (no narrowing)."""
    f64 = torch.float64
    return f64 if any(t.dtype is f64 for t in tensors) else torch.float32


_BLAS_DTYPES = (torch.float32, torch.float64)


def _core(grads: list[torch.Tensor], device: torch.device, peak: bool = True,
          plan: SumPlan | None = None) -> torch.Tensor:
    """Per-layer sums of squares then, with ``peak``, max |g|: float64, flat ((2 if peak else 1) * n,), on
    ``device``."""
    if not grads:
        return torch.zeros(0, dtype=torch.float64, device=device)
    if device.type == "cpu" and not peak:
        return _sums_cpu(grads, plan)
    if device.type == "cuda":
        fused = _fused_core_cuda(grads)
        if fused is not None:
            return fused
    if device.type == "cpu":
        return _core_cpu(grads)
    # any other device, or CUDA without Triton: two multi-tensor kernels over all layers
    sq = torch.stack(torch._foreach_norm(grads, 2, dtype=_acc(grads))).double().square()
    if not peak:
        return sq
    maxes = torch.stack(torch._foreach_norm(grads, float("inf"))).double()
    return torch.cat([sq, maxes])


@dataclass(frozen=True)
class SumPlan:
    """How :func:`_sums_cpu` reads each gradient of a list, by position.

    ``tiny``: floating tensors of 1 to :data:`_TINY` elements, copied together into one float64 buffer and
    summed segment by segment (``offsets``: where each starts); ``large``: float32/float64 tensors of
    :data:`_SUM_CHUNK` elements or more, BLAS ``dot`` chunk by chunk; ``rest``: one ``_foreach_norm``
    accumulating in ``rest_acc`` (:func:`_acc`). The collector keeps its plan from one step to the next.

    >>> plan = SumPlan.of([torch.zeros(3), torch.zeros(_TINY + 1), torch.zeros(5), torch.zeros(_SUM_CHUNK)])
    >>> plan.tiny.tolist(), plan.offsets.tolist(), plan.rest.tolist(), plan.large
    ([0, 2], [0, 3], [1], (3,))
    """

    tiny: np.ndarray
    offsets: np.ndarray
    rest: np.ndarray
    rest_acc: torch.dtype
    large: tuple[int, ...]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> SumPlan:
        tiny, sizes, rest, large = [], [], [], []
        for i, t in enumerate(tensors):
            n = t.numel()
            if 0 < n <= _TINY and t.is_floating_point():
                tiny.append(i)
                sizes.append(n)
            elif n >= _SUM_CHUNK and t.dtype in _BLAS_DTYPES:
                large.append(i)
            else:
                rest.append(i)
        offsets = np.cumsum([0, *sizes[:-1]], dtype=np.int64) if sizes else np.zeros(0, np.int64)
        return cls(np.asarray(tiny, np.int64), offsets, np.asarray(rest, np.int64),
                   _acc([tensors[i] for i in rest]), tuple(large))


def _sums_cpu(grads: Sequence[torch.Tensor], plan: SumPlan | None = None) -> torch.Tensor:
    """Sums of squares on CPU from one read of each gradient, float64, in the list's order.

    Tiny tensors (:class:`SumPlan`) together: one ``cat``, squares and per-tensor sums in float64 (exact to
    1e-13); large float32/float64 ones: BLAS ``dot(g, g)`` per :data:`_SUM_CHUNK` elements, chunk sums added in
    float64 (measured: 0.75x the time of one ``_foreach_norm`` and 100x closer to the float64 sum, whose
    float32 accumulator drifts by 5e-5 on 1.6M elements); the others: one ``_foreach_norm`` accumulating in
    float32 (float64 when one is float64).

    >>> g = [torch.tensor([3.0, 4.0]), torch.ones(_TINY + 1), torch.tensor([1.0], dtype=torch.bfloat16)]
    >>> _sums_cpu(g).round(decimals=3).tolist()
    [25.0, 4097.0, 1.0]
    """
    plan = plan or SumPlan.of(grads)
    out = np.empty(len(grads))
    if plan.tiny.size:
        flat = torch.cat([grads[i] if grads[i].dim() == 1 else grads[i].reshape(-1) for i in plan.tiny])
        a = flat.to(torch.float64).numpy()  # cat's own new buffer (converted or not): squared in place
        with np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf pass through; make_exact counts them
            out[plan.tiny] = np.add.reduceat(np.square(a, out=a), plan.offsets)
    if plan.rest.size:
        rest = [grads[i] for i in plan.rest]
        norms = torch.stack(torch._foreach_norm(rest, 2, dtype=plan.rest_acc)).numpy().astype(np.float64)
        out[plan.rest] = norms * norms
    for i in plan.large:
        flat = grads[i].reshape(-1)
        out[i] = sum(float(torch.dot(c, c)) for c in flat.split(_SUM_CHUNK))  # float64 between chunks
    return torch.from_numpy(out)


def _core_cpu(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sums of squares and max |g| on CPU at about the cost of one ``_foreach_norm``.

    Large float32/float64 tensors: ``torch.dot(g, g)`` (a BLAS kernel, with float32 accumulation like
    ``_foreach_norm``) and ``aminmax``, chunk by chunk (:data:`_CHUNK`) so that the second pass reads from the
    cache, chunk sums added in float64; a float32 sum that overflows
    is recomputed in float64 by :meth:`GradCollector.fix_overflow` (the maximum tells it from NaN/Inf). Small or
    other tensors: one ``_foreach_norm`` for all and one ``aminmax`` each (measured: ``benchmarks/peers.py``;
    profile with ``benchmarks/overhead.py --profile``).
    """
    large = [i for i, g in enumerate(grads)
             if g.numel() > _SMALL and g.dtype in (torch.float32, torch.float64) and g.is_contiguous()]
    if len(large) < len(grads):
        sm = grads if not large else [g for i, g in enumerate(grads) if i not in set(large)]
        sq_s = torch.stack(torch._foreach_norm(sm, 2, dtype=_acc(sm))).double().square()
        # one aminmax per tensor: measured 1.5x faster than _foreach_max(_foreach_abs(...)), which copies
        lo_hi = [torch.aminmax(g) for g in sm]
        mx_s = torch.maximum(torch.stack([h for _, h in lo_hi]).double(),
                             torch.stack([lo for lo, _ in lo_hi]).double().neg())
        if not large:
            return torch.cat([sq_s, mx_s])
    dots, his, los = [], [], []
    for i in large:
        flat = grads[i].view(-1)
        if flat.numel() <= _CHUNK:
            dots.append(torch.dot(flat, flat).double())
            lo, hi = torch.aminmax(flat)
        else:  # chunk by chunk: aminmax reads what dot just brought into the cache
            d, h, low = [], [], []
            for c in flat.split(_CHUNK):
                d.append(torch.dot(c, c))
                lo, hi = torch.aminmax(c)
                h.append(hi)
                low.append(lo)
            dots.append(torch.stack(d).double().sum())
            hi, lo = torch.stack(h).max(), torch.stack(low).min()  # max/min propagate NaN
        his.append(hi.double())
        los.append(lo.double())
    sq_l = torch.stack(dots)
    mx_l = torch.maximum(torch.stack(his), torch.stack(los).neg())
    if len(large) == len(grads):
        return torch.cat([sq_l, mx_l])
    order = _cpu_order(len(grads), tuple(large))  # small layers first, then large: back to the layers' order
    return torch.cat([sq_s, sq_l, mx_s, mx_l])[order]


_orders: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}


def _cpu_order(n: int, large: tuple[int, ...]) -> torch.Tensor:
    """Index that puts ``[small..., large...]`` (sums, then maxima) back into layer order."""
    key = (n, large)
    if key not in _orders:
        big = set(large)
        first = [i for i in range(n) if i not in big] + list(large)
        pos = [0] * n
        for j, i in enumerate(first):
            pos[i] = j
        _orders[key] = torch.tensor(pos + [n + p for p in pos], dtype=torch.int64)
    return _orders[key]


# ---- CUDA: one fused Triton kernel over all layers ----------------------------------------------------------
#: Elements one Triton program reads (BLOCK x ITERS): few programs per small layer, enough for the large ones.
_TRITON_BLOCK, _TRITON_ITERS = 1024, 8
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_state: dict[str, object] = {}


def _triton_kernel():
    """The compiled-on-first-use Triton kernel, or None when Triton is missing or failed its self-check."""
    if "kernel" in _triton_state:
        return _triton_state["kernel"]
    kernel = None
    try:
        import triton  # type: ignore[import-not-found,unused-ignore]
        import triton.language as tl  # type: ignore[import-not-found,unused-ignore]

        @triton.jit
        def _core_kernel(ptrs, block_tensor, block_start, numels, out_sq, out_max, out_nan,
                         BLOCK: tl.constexpr, ITERS: tl.constexpr, DTYPE: tl.constexpr):
            pid = tl.program_id(0)
            t = tl.load(block_tensor + pid)
            start = tl.load(block_start + pid)
            n = tl.load(numels + t)
            base = tl.load(ptrs + t).to(tl.pointer_type(DTYPE))
            acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
            acc_max = tl.zeros([BLOCK], dtype=tl.float32)
            acc_nan = tl.zeros([BLOCK], dtype=tl.int32)
            for i in range(ITERS):
                offs = start + i * BLOCK + tl.arange(0, BLOCK)
                x = tl.load(base + offs, mask=offs < n, other=0.0).to(tl.float32)
                acc_sq += x * x
                a = tl.abs(x)
                acc_max = tl.where(a > acc_max, a, acc_max)
                acc_nan = acc_nan | (x != x).to(tl.int32)
            tl.store(out_sq + pid, tl.sum(acc_sq, axis=0))
            tl.store(out_max + pid, tl.max(acc_max, axis=0))
            tl.store(out_nan + pid, tl.max(acc_nan, axis=0))

        _triton_state["raw"] = _core_kernel
        _triton_state["dtypes"] = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
        kernel = _core_kernel
    except Exception:  # no Triton (CPU builds, ROCm without it, ...): the foreach kernels do the job
        log.debug("gfservice: no Triton kernel; using foreach kernels", exc_info=True)
        kernel = None
    _triton_state["kernel"] = kernel
    return kernel


class _TritonLayout:
    """Device tables of one list of gradients (tensor of each program, its first element): built once per
    shapes, reused while they stay the same; the data pointers travel each step unless unchanged."""

    def __init__(self, numels: list[int], device: torch.device):
        per = _TRITON_BLOCK * _TRITON_ITERS
        tensor_of, start_of = [], []
        for t, n in enumerate(numels):
            for s in range(0, n, per):
                tensor_of.append(t)
                start_of.append(s)
        self.programs = len(tensor_of)
        self.block_tensor = torch.tensor(tensor_of, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
        self.block_start = torch.tensor(start_of, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
        self.numels = torch.tensor(numels, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
        self.ptr_key: tuple[int, ...] = ()
        self.ptrs: torch.Tensor | None = None

    def pointers(self, grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
        key = tuple(g.data_ptr() for g in grads)
        if key != self.ptr_key or self.ptrs is None:
            self.ptrs = torch.tensor(key, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
            self.ptr_key = key
        return self.ptrs


_triton_layouts: dict[tuple, _TritonLayout] = {}


def _fused_core_cuda(grads: list[torch.Tensor]) -> torch.Tensor | None:
    """Sums of squares and max |g| of every layer from one read of each gradient: one Triton launch per dtype,
    partial results per program reduced on the device. None when Triton cannot do it (the caller falls back)."""
    kernel = _triton_kernel()
    if kernel is None or not all(g.dtype in _TRITON_DTYPES and g.is_contiguous() for g in grads):
        return None
    device = grads[0].device
    n = len(grads)
    sq = torch.zeros(n, dtype=torch.float64, device=device)
    mx = torch.zeros(n, dtype=torch.float64, device=device)
    nan = torch.zeros(n, dtype=torch.int64, device=device)
    for dtype in {g.dtype for g in grads}:
        idx = [i for i, g in enumerate(grads) if g.dtype == dtype]
        group = [grads[i] for i in idx]
        key = (device, dtype, tuple(g.numel() for g in group))
        lay = _triton_layouts.get(key)
        if lay is None:
            lay = _triton_layouts[key] = _TritonLayout(list(key[2]), device)
        out_sq = torch.empty(lay.programs, dtype=torch.float32, device=device)
        out_max = torch.empty(lay.programs, dtype=torch.float32, device=device)
        out_nan = torch.empty(lay.programs, dtype=torch.int32, device=device)
        kernel[(lay.programs,)](lay.pointers(group, device), lay.block_tensor, lay.block_start, lay.numels,
                                out_sq, out_max, out_nan, BLOCK=_TRITON_BLOCK, ITERS=_TRITON_ITERS,
                                DTYPE=_triton_state["dtypes"][dtype])  # type: ignore[index]
        where = lay.block_tensor if len(idx) == n else _index(idx, device)[lay.block_tensor]
        sq.index_add_(0, where, out_sq.double())
        mx.scatter_reduce_(0, where, out_max.double(), "amax")
        nan.index_add_(0, where, out_nan.long())
    mx = torch.where(nan > 0, torch.full_like(mx, float("nan")), mx)
    return torch.cat([sq, mx])


_indices: dict[tuple, torch.Tensor] = {}


def _index(idx: list[int], device: torch.device) -> torch.Tensor:
    key = (device, tuple(idx))
    if key not in _indices:
        _indices[key] = torch.tensor(idx, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
    return _indices[key]


def triton_self_check(device: torch.device) -> bool:
    """Run the fused kernel once on known values and keep it only if it agrees with torch (call outside the
    training loop: it synchronises). False, and the foreach kernels from then on, when it does not.
    """
    if _triton_kernel() is None:
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        vals = [torch.randn(s, generator=gen) * 3 for s in (1, 7, 1000, 40000)]
        vals[1][3] = float("nan")
        grads = [v.to(device, dt) for v, dt in zip(vals, (torch.float32, torch.bfloat16, torch.float16,
                                                          torch.float32), strict=True)]
        got = _fused_core_cuda(grads)
        assert got is not None
        host = got.cpu().numpy()
        ref_sq = np.array([float(g.double().square().sum()) for g in grads])
        ref_mx = np.array([float(g.double().abs().max()) for g in grads])
        ok = bool(np.allclose(host[:4], ref_sq, rtol=1e-4, equal_nan=True)
                  and np.allclose(host[4:], ref_mx, rtol=1e-6, equal_nan=True)
                  and np.isnan(host[5]) and np.isnan(host[1]))
    except Exception:
        log.warning("gfservice: the fused Triton kernel failed its self-check; using foreach kernels", exc_info=True)
        ok = False
    if not ok:
        _triton_state["kernel"] = None
    return ok


def _packed(values: dict[str, torch.Tensor], tier: str, device: torch.device) -> torch.Tensor:
    """The kernels' results for the statistics of ``tier``, float64, flat, in their declaration order
    (:data:`gfservice.stats.TIERS`): the one place that orders what ``_unpack`` reads back."""
    names = TIERS[tier]
    if set(values) != set(names):
        raise RuntimeError(f"the {tier} kernels give {sorted(values)}, the schema declares {list(names)}")
    if not names:
        return torch.zeros(0, dtype=torch.float64, device=device)
    return torch.cat([values[k].double().reshape(-1).to(device) for k in names])


def _deep(grads: list[torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The deep statistics of each gradient, by name: one kernel per declared deep statistic."""
    if not grads:
        return {name: torch.zeros((0, BY_NAME[name].bins) if BY_NAME[name].bins else 0, device=device)
                for name in TIERS["deep"]}
    sum_abs = torch.stack(torch._foreach_norm(grads, 1, dtype=_acc(grads)))
    if device.type == "cpu":
        hist, zeros, dead = _histogram_zeros_dead_cpu(grads)
    else:
        hist = torch.stack([_exp_hist(g) for g in grads])
        zeros = torch.stack([g.numel() - torch.count_nonzero(g) for g in grads])
        dead = torch.stack([_dead_rows(g) for g in grads])
    return {"sum_abs": sum_abs, "zeros": zeros, "exp_hist": hist, "dead_units": dead}


def _dead_from_exponents(g: torch.Tensor, e: torch.Tensor, zeros: int, bin0: int) -> int:
    """Dead rows of ``g`` given its exact zero count and its one-byte exponents ``e``: a dead row is a row of
    bin-0 exponents (zeros and fp32 subnormals), checked on the values only when bin 0 holds subnormals."""
    if g.dim() < 2:  # the units of a 1-d parameter are its elements
        return zeros
    if zeros < g[0].numel():
        return 0
    rows = g.reshape(g.shape[0], -1)
    maybe = e.view(rows.shape).any(dim=1).logical_not()  # any() of uint8 is uint8
    if zeros == bin0:  # bin 0 holds no subnormal: those rows are all zeros
        return int(maybe.sum())
    return int((~rows[maybe].any(dim=1)).sum()) if maybe.any() else 0


def _dead_rows(g: torch.Tensor) -> torch.Tensor:
    """Rows (output units) of ``g`` whose gradient is exactly zero: dim 0 for 2-d and larger, elements for 1-d."""
    rows = g.reshape(g.shape[0], -1) if g.dim() >= 2 else g.reshape(-1, 1)
    return rows.any(dim=1).logical_not().sum()


def _exponents(g: torch.Tensor) -> torch.Tensor:
    """The biased fp32 exponent of every element of ``g``, flat (widening to fp32 is exact for fp16/bf16/fp8)."""
    bits = g.float().reshape(-1).view(torch.int32) >> 23  # sign-extended: -256 + exponent for negative values
    if g.device.type == "cpu":
        return bits.to(torch.uint8)  # wraps to the exponent; a quarter of the bytes for bincount to read
    return (bits & 0xFF).long()


def _exp_hist(g: torch.Tensor) -> torch.Tensor:
    """Histogram of the biased fp32 exponent of |g|."""
    e = _exponents(g)
    if g.device.type == "cpu":
        return torch.bincount(e, minlength=EXP_BINS)
    # bincount sizes its output from the data (a host sync on CUDA); a fixed-size index_add does not.
    out = torch.zeros(EXP_BINS, dtype=torch.int64, device=g.device)
    return out.index_add_(0, e, torch.ones((), dtype=torch.int64, device=g.device).expand(e.numel()))


def _histogram_zeros_dead_cpu(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exponent histograms, exact zeros and dead rows on CPU, reading the gradients once more only where the
    histogram allows them: a zero sits in bin 0 (with the fp32 subnormals), and a dead row needs a row of
    bin-0 exponents (found on the one-byte exponents; checked on the values of those rows only when bin 0 holds
    subnormals too)."""
    hists, zeros, dead = [], [0] * len(grads), [0] * len(grads)
    for i, g in enumerate(grads):
        e = _exponents(g)
        hist = torch.bincount(e, minlength=EXP_BINS)
        hists.append(hist)
        if not int(hist[0]):
            continue
        zeros[i] = int(g.numel() - torch.count_nonzero(g))
        dead[i] = _dead_from_exponents(g, e, zeros[i], int(hist[0]))
    return torch.stack(hists), torch.tensor(zeros, dtype=torch.int64), torch.tensor(dead, dtype=torch.int64)


def _weight_sums(weights: list[torch.Tensor], before: list[torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Per-layer sums of squares of the weights and of this step's update (float64: they merge by adding)."""
    if device.type == "cpu":  # one read each: the sums' BLAS path, and dist() with no difference written out
        w = _sums_cpu(weights)
        u = torch.stack([torch.dist(b, a).double() for b, a in zip(before, weights, strict=True)]).square()
        return {"weight_sq": w, "update_sq": u}
    w = torch.stack(torch._foreach_norm(weights, 2, dtype=_acc(weights))).double()
    torch._foreach_sub_(before, weights)  # the snapshot is not needed afterwards: reuse it for the update
    u = torch.stack(torch._foreach_norm(before, 2, dtype=_acc(weights))).double()
    return {"weight_sq": w.square(), "update_sq": u.square()}


def _host_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Loss, scale ... of CPU tensors or numbers as floats, by name (a tensor's first element)."""
    return {k: _host_float(v) for k, v in values.items()}


def _host_float(v: torch.Tensor | float) -> float:
    if not isinstance(v, torch.Tensor):
        return float(v)
    v = _local(v).detach()
    return v.item() if v.numel() == 1 else float(v.reshape(-1)[0])


def _extras(values: Sequence[torch.Tensor | float], device) -> torch.Tensor:
    """Loss, scale ... as one float64 vector on ``device`` (one copy with the rest)."""
    items = []
    for v in values:
        if isinstance(v, torch.Tensor):
            items.append(_local(v.detach()).reshape(-1)[:1].double().to(device))
        else:
            items.append(torch.tensor([float(v)], dtype=torch.float64, device=device))
    return torch.cat(items)


def _to_host(packed: torch.Tensor):
    if packed.device.type == "cpu":
        return packed, None
    host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
    host.copy_(packed, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


class LocalNormHook:
    """A DDP communication hook that notes this rank's squared gradient norm *before* the allreduce.

    Chained with DDP's default allreduce, so training is unchanged. The sum stays on the device; the
    monitor ships it with the step's other statistics (it tells which rank produced a NaN). It also notes
    when the first bucket of a step was ready: the end of this rank's own data, forward and backward work,
    before it waits for the others in the all-reduce (what tells a straggler apart under DDP).
    """

    def __init__(self, process_group=None):
        self.process_group = process_group
        self._sq: torch.Tensor | None = None
        self._first_bucket: float | None = None

    def add(self, buf: torch.Tensor) -> None:
        if self._sq is None:
            self._first_bucket = time.perf_counter()
        sq = torch.linalg.vector_norm(buf, dtype=torch.float64).square()
        self._sq = sq if self._sq is None else self._sq + sq

    def take_first_bucket_time(self) -> float | None:
        """``time.perf_counter()`` when the first bucket of the step was ready (None when none ran)."""
        t, self._first_bucket = self._first_bucket, None
        return t

    def take(self) -> torch.Tensor | None:
        """The squared local norm accumulated since the last call (None when no bucket ran)."""
        sq, self._sq = self._sq, None
        return sq

    @classmethod
    def install(cls, ddp_model) -> LocalNormHook | None:
        """Register on a DistributedDataParallel model; None when it already has a hook of its own."""
        hook = cls()
        try:
            ddp_model.register_comm_hook(hook, _local_norm_then_allreduce)
        except Exception:
            return None
        return hook


def _local_norm_then_allreduce(state: LocalNormHook, bucket):
    """DDP comm hook: note the bucket's local squared norm, then DDP's default allreduce."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.add(bucket.buffer())
    return allreduce_hook(state.process_group, bucket)


def is_ddp(model) -> bool:
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def has_sharded_parameters(model) -> bool:
    return any(is_sharded(p) for p in model.parameters())


def grad_stats(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], deep: bool = False,
               include: Sequence[str] = (), exclude: Sequence[str] = ()) -> GradStats:
    """Statistics of the current gradients of ``named_parameters`` (library use, no service).

    ``nonfinite`` holds exact counts here, and ``max_abs`` is always read.
    """
    collector = GradCollector(named_parameters, include, exclude)
    stats = collector.launch(deep=deep, peak=True).resolve().grads
    collector.make_exact(stats)
    return stats
