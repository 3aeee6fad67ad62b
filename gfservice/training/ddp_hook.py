"""The DDP communication hook that notes each rank's own gradient norm before the allreduce.

>>> hook = LocalNormHook()
>>> hook.add(torch.tensor([3.0, 4.0]))
>>> float(hook.take()), hook.take()
(25.0, None)
>>> is_ddp(torch.nn.Linear(1, 1))
False
"""

from __future__ import annotations

import time
from typing import Any

import torch


class LocalNormHook:
    """A DDP communication hook that notes this rank's squared gradient norm *before* the allreduce.

    Chained with DDP's default allreduce, so training is unchanged. The sum stays on the device; the
    monitor ships it with the step's other statistics (it tells which rank produced a NaN). It also notes
    when the first bucket of a step was ready: the end of this rank's own data, forward and backward work,
    before it waits for the others in the all-reduce (what tells a straggler apart under DDP).
    """

    def __init__(self, process_group: Any = None):
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
    def install(cls, ddp_model: Any) -> LocalNormHook | None:
        """Register on a DistributedDataParallel model; None when it already has a hook of its own."""
        hook = cls()
        try:
            ddp_model.register_comm_hook(hook, _local_norm_then_allreduce)
        except Exception:
            return None
        return hook


def _local_norm_then_allreduce(state: LocalNormHook, bucket):
    """DDP comm hook: note the bucket's local squared norm, then DDP's default allreduce.

    ``bucket`` and the result stay unannotated: ``register_comm_hook`` refuses any annotation but its own
    classes, and ``LocalNormHook.install`` would then quietly install nothing."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.add(bucket.buffer())
    return allreduce_hook(state.process_group, bucket)


def is_ddp(model: Any) -> bool:
    """Whether ``model`` is wrapped in DistributedDataParallel."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)
