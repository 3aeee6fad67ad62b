"""Gradient reductions on CPU: sums of squares (and max |g|) from one read of each gradient.

The sums alone (:func:`sums_cpu`, the usual core step) or with the maxima (:func:`core_cpu`, deep steps and
where a bound needs them), float64, in the list's order. Measured with ``benchmarks/peers.py`` (profile with
``benchmarks/overhead.py --profile``).

>>> g = [torch.tensor([3.0, -4.0]), torch.ones(SMALL + 1)]
>>> core_cpu(g).tolist()
[25.0, 65537.0, 4.0, 1.0]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gfservice.training.kernels import accumulation_dtype

#: On CPU, tensors up to this many elements go through the multi-tensor (``_foreach``) kernels, whose per-call
#: overhead is shared; larger ones get one BLAS ``dot`` and one ``aminmax`` each (see :func:`core_cpu`).
SMALL = 1 << 16
#: Large CPU tensors are read in chunks of this many elements (1 MiB of float32): ``dot`` then ``aminmax`` per
#: chunk, the second pass from the cache (measured 1.6-1.7x the one-norm floor against 2.0x unchunked, 1 thread).
CHUNK = 1 << 18
#: Chunk of a sum-only read of a large tensor (:func:`sums_cpu`): 4 MiB of float32, float64 between chunks.
SUM_CHUNK = 1 << 20
#: Gradients up to this many elements (biases, norms, small embeddings) are summed together by
#: :func:`sums_cpu`: one copy into a float64 buffer and one segmented sum, where a kernel each costs 4-10 µs
#: of dispatch (measured on the 303 tensors of ``benchmarks/peers.py``'s transformer: 0.92x the one-norm floor
#: at 4,096, 1.2x at 8,192 as the copy outgrows the dispatch it saves, 1.22x with one ``_foreach_norm``).
TINY = 4096


_BLAS_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class SumPlan:
    """How :func:`sums_cpu` reads each gradient of a list, by position (plain ``int`` tuples: indexing a list
    with numpy integers costs several times more).

    ``tiny``: floating tensors of 1 to :data:`TINY` elements, copied together into one float64 buffer and
    summed segment by segment (``offsets``: where each starts); ``dots``: float32/float64 tensors between
    those and :data:`SUM_CHUNK`, one numpy (BLAS) ``dot`` each; ``large``: float32/float64 tensors of
    :data:`SUM_CHUNK` elements or more, BLAS ``dot`` chunk by chunk; ``rest`` (other dtypes): one
    ``_foreach_norm`` accumulating in ``rest_acc`` (:func:`accumulation_dtype`). The collector keeps its plan
    from one step to the next.

    >>> plan = SumPlan.of([torch.zeros(3), torch.zeros(TINY + 1), torch.zeros(5), torch.zeros(SUM_CHUNK),
    ...                    torch.zeros(TINY + 1, dtype=torch.bfloat16)])
    >>> plan.tiny, plan.offsets.tolist(), plan.dots, plan.large, plan.rest
    ((0, 2), [0, 3], (1,), (3,), (4,))
    """

    tiny: tuple[int, ...]
    offsets: np.ndarray
    dots: tuple[int, ...]
    rest: tuple[int, ...]
    rest_acc: torch.dtype
    large: tuple[int, ...]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor]) -> SumPlan:
        tiny, sizes, dots, rest, large = [], [], [], [], []
        for i, t in enumerate(tensors):
            n = t.numel()
            if 0 < n <= TINY and t.is_floating_point():
                tiny.append(i)
                sizes.append(n)
            elif n >= SUM_CHUNK and t.dtype in _BLAS_DTYPES:
                large.append(i)
            elif n and t.dtype in _BLAS_DTYPES:
                dots.append(i)
            else:
                rest.append(i)
        offsets = np.cumsum([0, *sizes[:-1]], dtype=np.int64) if sizes else np.zeros(0, np.int64)
        return cls(tuple(tiny), offsets, tuple(dots), tuple(rest),
                   accumulation_dtype([tensors[i] for i in rest]), tuple(large))


def sums_cpu(grads: Sequence[torch.Tensor], plan: SumPlan | None = None) -> torch.Tensor:
    """Sums of squares on CPU from one read of each gradient, float64, in the list's order.

    Tiny tensors (:class:`SumPlan`) together: one ``cat``, squares and per-tensor sums in float64 (exact to
    1e-13); mid-sized float32/float64 ones: numpy's BLAS ``dot(g, g)`` each, float32 accumulation like
    ``_foreach_norm`` for float32 (measured on ``benchmarks/peers.py``'s transformer: 0.5 ms for its 102
    mid-sized tensors against 0.66 ms for one ``_foreach_norm`` and the ``stack`` that brings its 0-dim
    results to the host); large ones: BLAS ``dot`` per :data:`SUM_CHUNK` elements, chunk sums added in float64
    (measured: 0.75x the time of one ``_foreach_norm`` and 100x closer to the float64 sum, whose float32
    accumulator drifts by 5e-5 on 1.6M elements); the others (fp16, bf16): one ``_foreach_norm`` accumulating
    in float32.

    >>> g = [torch.tensor([3.0, 4.0]), torch.ones(TINY + 1), torch.tensor([1.0], dtype=torch.bfloat16),
    ...      torch.full((TINY + 1,), 2.0, dtype=torch.bfloat16)]
    >>> sums_cpu(g).round(decimals=3).tolist()
    [25.0, 4097.0, 1.0, 16388.0]
    """
    plan = plan or SumPlan.of(grads)
    out = np.empty(len(grads))
    if plan.tiny:
        flat = torch.cat([grads[i] if grads[i].dim() == 1 else grads[i].reshape(-1) for i in plan.tiny])
        a = flat.to(torch.float64).numpy()  # cat's own new buffer (converted or not): squared in place
        with np.errstate(over="ignore", invalid="ignore"):  # NaN/Inf pass through; make_exact counts them
            out[list(plan.tiny)] = np.add.reduceat(np.square(a, out=a), plan.offsets)
    dot = np.dot
    with np.errstate(over="ignore", invalid="ignore"):
        for i in plan.dots:
            v = grads[i].numpy().ravel()  # a view (a copy only for a non-contiguous gradient)
            out[i] = dot(v, v)
    if plan.rest:
        norms = torch._foreach_norm([grads[i] for i in plan.rest], 2, dtype=plan.rest_acc)
        for i, norm in zip(plan.rest, norms, strict=True):
            out[i] = norm.item() ** 2
    for i in plan.large:
        flat = grads[i].reshape(-1)
        out[i] = sum(float(torch.dot(c, c)) for c in flat.split(SUM_CHUNK))  # float64 between chunks
    return torch.from_numpy(out)


def core_cpu(grads: list[torch.Tensor]) -> torch.Tensor:
    """Sums of squares and max |g| on CPU at about the cost of one ``_foreach_norm``.

    Large float32/float64 tensors: ``torch.dot(g, g)`` (a BLAS kernel, with float32 accumulation like
    ``_foreach_norm``) and ``aminmax``, chunk by chunk (:data:`CHUNK`) so that the second pass reads from the
    cache, chunk sums added in float64; a float32 sum that overflows is recomputed in float64 by
    :meth:`~gfservice.training.collect.GradCollector.fix_overflow` (the maximum tells it from NaN/Inf). Small or
    other tensors: one ``_foreach_norm`` for all and one ``aminmax`` each (measured: ``benchmarks/peers.py``;
    profile with ``benchmarks/overhead.py --profile``).
    """
    large = [i for i, g in enumerate(grads)
             if g.numel() > SMALL and g.dtype in (torch.float32, torch.float64) and g.is_contiguous()]
    if len(large) < len(grads):
        sm = grads if not large else [g for i, g in enumerate(grads) if i not in set(large)]
        sq_s = torch.stack(torch._foreach_norm(sm, 2, dtype=accumulation_dtype(sm))).double().square()
        # one aminmax per tensor: measured 1.5x faster than _foreach_max(_foreach_abs(...)), which copies
        lo_hi = [torch.aminmax(g) for g in sm]
        mx_s = torch.maximum(torch.stack([h for _, h in lo_hi]).double(),
                             torch.stack([lo for lo, _ in lo_hi]).double().neg())
        if not large:
            return torch.cat([sq_s, mx_s])
    dots, his, los = [], [], []
    for i in large:
        flat = grads[i].view(-1)
        if flat.numel() <= CHUNK:
            dots.append(torch.dot(flat, flat).double())
            lo, hi = torch.aminmax(flat)
        else:  # chunk by chunk: aminmax reads what dot just brought into the cache
            d, h, low = [], [], []
            for c in flat.split(CHUNK):
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


@functools.cache
def _cpu_order(n: int, large: tuple[int, ...]) -> torch.Tensor:
    """Index that puts ``[small..., large...]`` (sums, then maxima) back into layer order (kept per layout)."""
    big = set(large)
    first = [i for i in range(n) if i not in big] + list(large)
    pos = [0] * n
    for j, i in enumerate(first):
        pos[i] = j
    return torch.tensor(pos + [n + p for p in pos], dtype=torch.int64)
