"""The reductions over a list of gradients, per device: :mod:`.cpu` (BLAS and multi-tensor kernels),
:mod:`.cuda` (one fused Triton kernel) and :mod:`.deep` (the deep and update statistics, any device).

:mod:`gfservice.training.collect` picks one per step and packs their results for one copy to the host.

>>> import torch
>>> accumulation_dtype([torch.ones(1, dtype=torch.float16)]), accumulation_dtype([torch.ones(1, dtype=torch.float64)])
(torch.float32, torch.float64)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def accumulation_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """Accumulation dtype of the norms: float32, or float64 when a tensor is float64 (no narrowing)."""
    f64 = torch.float64
    return f64 if any(t.dtype is f64 for t in tensors) else torch.float32
