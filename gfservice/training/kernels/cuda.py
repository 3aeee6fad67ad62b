"""Gradient reductions on CUDA: one fused Triton kernel reads every layer once for its sum of squares and max |g|.

:data:`TRITON`, the process's one :class:`TritonCore`, compiles the kernel on first use, checks it once against
torch (:meth:`TritonCore.check_once`) and keeps the device tables of each list of gradients it has read. Without
Triton, or when the check fails, it answers None and the caller uses the foreach kernels.

>>> core = TritonCore()
>>> core.in_use
False
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Elements one Triton program reads (BLOCK x ITERS): few programs per small layer, enough for the large ones.
BLOCK, ITERS = 1024, 8
#: The gradient dtypes the kernel reads.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _compile() -> tuple[Any, dict[torch.dtype, Any]] | None:
    """The Triton kernel and the Triton dtype of each torch dtype, or None when Triton is missing."""
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

        return _core_kernel, {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
    except Exception:  # no Triton (CPU builds, ROCm without it, ...): the foreach kernels do the job
        log.debug("gfservice: no Triton kernel; using foreach kernels", exc_info=True)
        return None


class _Layout:
    """Device tables of one list of gradients (tensor of each program, its first element): built once per
    shapes, reused while they stay the same; the data pointers travel each step unless unchanged."""

    def __init__(self, numels: list[int], device: torch.device):
        per = BLOCK * ITERS
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


class TritonCore:
    """The fused Triton kernel and what it keeps between steps: the compiled kernel (None without Triton or after
    a failed self-check), the self-check's verdict, the device tables per list of shapes and the device index of
    each dtype group."""

    def __init__(self) -> None:
        self._loaded = False
        self._kernel: Any = None
        self._dtypes: dict[torch.dtype, Any] = {}
        #: The self-check's verdict: None until :meth:`check_once` ran.
        self.checked: bool | None = None
        self._layouts: dict[tuple[torch.device, torch.dtype, tuple[int, ...]], _Layout] = {}
        self._indices: dict[tuple[torch.device, tuple[int, ...]], torch.Tensor] = {}

    @property
    def in_use(self) -> bool:
        """Whether the kernel is compiled and has not failed its self-check."""
        return self._loaded and self._kernel is not None

    def kernel(self) -> Any:
        """The compiled-on-first-use Triton kernel, or None when Triton is missing or failed its self-check."""
        if not self._loaded:
            compiled = _compile()
            if compiled is not None:
                self._kernel, self._dtypes = compiled
            self._loaded = True
        return self._kernel

    def check_once(self, device: torch.device) -> bool:
        """:meth:`self_check` on the first call of the process (before its first step), its verdict after."""
        if self.checked is None:
            self.checked = self.self_check(device)
        return self.checked

    def __call__(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """Sums of squares and max |g| of every layer from one read of each gradient: one Triton launch per dtype,
        partial results per program reduced on the device. None when Triton cannot do it (the caller falls
        back)."""
        kernel = self.kernel()
        if kernel is None or not all(g.dtype in DTYPES and g.is_contiguous() for g in grads):
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
            lay = self._layouts.get(key)
            if lay is None:
                lay = self._layouts[key] = _Layout(list(key[2]), device)
            out_sq = torch.empty(lay.programs, dtype=torch.float32, device=device)
            out_max = torch.empty(lay.programs, dtype=torch.float32, device=device)
            out_nan = torch.empty(lay.programs, dtype=torch.int32, device=device)
            kernel[(lay.programs,)](lay.pointers(group, device), lay.block_tensor, lay.block_start, lay.numels,
                                    out_sq, out_max, out_nan, BLOCK=BLOCK, ITERS=ITERS, DTYPE=self._dtypes[dtype])
            where = lay.block_tensor if len(idx) == n else self._index(idx, device)[lay.block_tensor]
            sq.index_add_(0, where, out_sq.double())
            mx.scatter_reduce_(0, where, out_max.double(), "amax")
            nan.index_add_(0, where, out_nan.long())
        mx = torch.where(nan > 0, torch.full_like(mx, float("nan")), mx)
        return torch.cat([sq, mx])

    def _index(self, idx: list[int], device: torch.device) -> torch.Tensor:
        key = (device, tuple(idx))
        if key not in self._indices:
            self._indices[key] = torch.tensor(idx, dtype=torch.int64).pin_memory().to(device, non_blocking=True)
        return self._indices[key]

    def self_check(self, device: torch.device) -> bool:
        """Run the fused kernel once on known values and keep it only if it agrees with torch (call outside the
        training loop: it synchronises). False, and the foreach kernels from then on, when it does not.
        """
        if self.kernel() is None:
            return False
        try:
            gen = torch.Generator().manual_seed(0)
            vals = [torch.randn(s, generator=gen) * 3 for s in (1, 7, 1000, 40000)]
            vals[1][3] = float("nan")
            grads = [v.to(device, dt) for v, dt in zip(vals, (torch.float32, torch.bfloat16, torch.float16,
                                                              torch.float32), strict=True)]
            got = self(grads)
            assert got is not None
            host = got.cpu().numpy()
            ref_sq = np.array([float(g.double().square().sum()) for g in grads])
            ref_mx = np.array([float(g.double().abs().max()) for g in grads])
            ok = bool(np.allclose(host[:4], ref_sq, rtol=1e-4, equal_nan=True)
                      and np.allclose(host[4:], ref_mx, rtol=1e-6, equal_nan=True)
                      and np.isnan(host[5]) and np.isnan(host[1]))
        except Exception:
            log.warning("gfservice: the fused Triton kernel failed its self-check; using foreach kernels",
                        exc_info=True)
            ok = False
        if not ok:
            self._kernel = None
        return ok


#: The process's fused kernel: compiled once, checked once, its tables shared by every collector.
TRITON = TritonCore()
