"""Gradient statistics on the gradients' device: the only torch code in gfservice.

Per collected step, every reduction runs as fused multi-tensor kernels on the device and all results
are packed into one float64 vector, copied to the host once. Nothing syncs per parameter. On CUDA the
copy is asynchronous (pinned memory and an event), so the training thread does not wait for it.

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
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gfservice.stats import BY_NAME, EXP_BINS, TIERS, GradStats, unit_rows

try:  # DTensor (FSDP2 parameters and gradients)
    from torch.distributed.tensor import DTensor, Shard
except Exception:  # pragma: no cover - very old torch or no distributed build
    DTensor = None  # type: ignore[misc,assignment]
    Shard = None  # type: ignore[misc,assignment]

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
    """Whether ``p`` is a DTensor split across ranks (any ``Shard`` placement)."""
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
            if self._event is not None:
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
        self._before: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.layers)

    # ---- the optimizer-step hook for update norms -------------------------------------------------
    def snapshot_weights(self) -> None:
        """Keep a copy of the weights (call just before the optimizer step of a deep step)."""
        with torch.no_grad():
            self._before = [_local(p.detach()).clone() for p in self.params]

    # ---- collection -----------------------------------------------------------------------------
    def launch(self, deep: bool = False, extras: dict[str, torch.Tensor | float | None] | None = None,
               layers: bool = True) -> Pending:
        """Start the reductions of this step's gradients and their copy to the host.

        ``extras`` (loss, loss scale, ...: name -> tensor or number) ride along in the same copy and come back
        by name as floats; ``None`` comes back as ``None``. With ``layers=False`` only the extras travel (a
        heartbeat).
        """
        extras = extras or {}
        with torch.no_grad():
            grads, have = [], []
            counts = np.zeros(len(self.params), np.int64)
            local = _local if self._any_dtensor else None
            for i, p in enumerate(self.params if layers else ()):
                g = p.grad  # no detach needed: nothing below records autograd history (no_grad)
                if g is not None:
                    if local is not None:
                        g = local(g)
                    n = g.numel()
                    if n:
                        grads.append(g)
                        have.append(i)
                        counts[i] = n
            device = grads[0].device if grads else self.params[0].device
            pieces = [_core(grads, device)]
            before = self._before
            with_weights = deep and before is not None
            if deep:
                pieces.append(_packed(_deep(grads, device), "deep", device))
                if before is not None:
                    weights = [_local(p.detach()) for p in self.params]
                    pieces.append(_packed(_weight_sums(weights, before, device), "update", device))
            self._before = None
            present = {k: v for k, v in extras.items() if v is not None}
            host_extras = None
            if device.type == "cpu":  # the values are here already: no tensor, no copy
                host_extras = _host_floats(present)
            elif present:
                pieces.append(_extras(list(present.values()), device))
            packed = torch.cat([p.reshape(-1) for p in pieces]) if len(pieces) > 1 else pieces[0].reshape(-1)
            host, event = _to_host(packed)
        names = list(extras)
        return Pending(host, event, lambda a: self._unpack(a, have, counts, deep, with_weights, names,
                                                             list(present), host_extras))

    def _unpack(self, a: np.ndarray, have: list[int], counts: np.ndarray, deep: bool, with_weights: bool,
                names: list[str], present: list[str], host_extras: dict[str, float] | None) -> Collected:
        L, n = len(self.params), len(have)

        def scatter(v: np.ndarray, dtype: type = np.float64) -> np.ndarray:
            if n == L:  # every layer has a gradient (the usual case)
                return v.astype(dtype)
            out: np.ndarray = np.zeros(L, dtype)
            out[have] = v
            return out

        pos = 0

        def take(k: int) -> np.ndarray:
            nonlocal pos
            v = a[pos: pos + k]
            pos += k
            return v

        norm = take(n)
        max_abs = take(n)
        with np.errstate(over="ignore", invalid="ignore"):
            sum_sq = scatter(np.square(norm))
        # max |g| is NaN/Inf exactly when some element is; a norm that overflowed its float32 accumulator
        # with a finite maximum is a huge gradient, not a non-finite one (see fix_overflow).
        flagged = ~np.isfinite(max_abs)
        stats = GradStats(
            layers=self.layers,
            count=counts,
            sum_sq=sum_sq,
            max_abs=scatter(max_abs),
            nonfinite=scatter(flagged.astype(np.int64), np.int64),
            units=np.asarray(self.units, np.int64),
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
        if host_extras is None:
            host_extras = dict(zip(present, (float(v) for v in take(len(present))), strict=True))
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
        """Exact NaN/Inf counts and float64 sums for the rare layers that need them (gradients still there)."""
        if stats.nonfinite.any():
            self.count_nonfinite(stats)
        if not np.all(np.isfinite(stats.sum_sq)):
            self.fix_overflow(stats)

    def count_nonfinite(self, stats: GradStats) -> None:
        """Replace the per-layer non-finite flags of ``stats`` by exact counts.

        Runs only for flagged layers (a rare event) and only while this step's gradients are still there.
        """
        with torch.no_grad():
            for i in np.flatnonzero(stats.nonfinite):
                g = self.params[i].grad
                if g is not None:
                    stats.nonfinite[i] = int((~torch.isfinite(_local(g))).sum())


#: Tensors up to this many elements take the fused max path on CPU.
_SMALL = 1 << 16


def _acc(tensors: list[torch.Tensor]) -> torch.dtype:
    """Accumulation dtype of the norms: float32, or float64 when a tensor is float64 (no narrowing)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _core(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Per-layer L2 norms then max |g|, float64, flat (2n,)."""
    if not grads:
        return torch.zeros(0, dtype=torch.float64, device=device)
    norms = torch.stack(torch._foreach_norm(grads, 2, dtype=_acc(grads))).double()
    if device.type == "cpu":
        # On CPU one aminmax pass per large tensor is several times faster than _foreach_norm(inf) or
        # _foreach_max(_foreach_abs(...)); for small tensors the fused call wins on per-call overhead
        # (measured when this was chosen; benchmarks/overhead.py --profile shows where the time goes).
        small = [i for i, g in enumerate(grads) if g.numel() <= _SMALL]
        if len(small) == len(grads):
            maxes = torch.stack(torch._foreach_max(torch._foreach_abs(grads))).double()
        else:
            maxes = torch.empty(len(grads), dtype=torch.float64, device=device)
            large = [i for i, g in enumerate(grads) if g.numel() > _SMALL]
            if small:
                sm = torch._foreach_max(torch._foreach_abs([grads[i] for i in small]))
                maxes[small] = torch.stack(sm).double()
            lo, hi = zip(*(torch.aminmax(grads[i]) for i in large), strict=True)
            maxes[large] = torch.maximum(torch.stack(hi), torch.stack(lo).neg()).double()
    else:
        maxes = torch.stack(torch._foreach_norm(grads, float("inf"))).double()
    return torch.cat([norms, maxes])


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
    return {
        "sum_abs": torch.stack(torch._foreach_norm(grads, 1, dtype=_acc(grads))),
        "zeros": torch.stack([g.numel() - torch.count_nonzero(g) for g in grads]),
        "exp_hist": torch.stack([_exp_hist(g) for g in grads]),
        "dead_units": torch.stack([_dead_rows(g) for g in grads]),
    }


def _dead_rows(g: torch.Tensor) -> torch.Tensor:
    """Rows (output units) of ``g`` whose gradient is exactly zero: dim 0 for 2-d and larger, elements for 1-d."""
    rows = g.reshape(g.shape[0], -1) if g.dim() >= 2 else g.reshape(-1, 1)
    return (rows != 0).any(dim=1).logical_not().sum()


def _exp_hist(g: torch.Tensor) -> torch.Tensor:
    """Histogram of the biased fp32 exponent of |g| (widening to fp32 is exact for fp16/bf16/fp8)."""
    # |g| clears the sign bit, so the shifted int32 is the biased exponent 0..255 with no mask and no int64 copy.
    e = g.float().reshape(-1).abs().view(torch.int32) >> 23
    if g.device.type == "cpu":
        return torch.bincount(e, minlength=EXP_BINS)
    e = e.long()
    # bincount sizes its output from the data (a host sync on CUDA); a fixed-size index_add does not.
    out = torch.zeros(EXP_BINS, dtype=torch.int64, device=g.device)
    return out.index_add_(0, e, torch.ones((), dtype=torch.int64, device=g.device).expand(e.numel()))


def _weight_sums(weights: list[torch.Tensor], before: list[torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Per-layer sums of squares of the weights and of this step's update (float64: they merge by adding)."""
    w = torch.stack(torch._foreach_norm(weights, 2, dtype=_acc(weights))).double()
    torch._foreach_sub_(before, weights)  # the snapshot is not needed afterwards: reuse it for the update
    u = torch.stack(torch._foreach_norm(before, 2, dtype=_acc(weights))).double()
    return {"weight_sq": w.square(), "update_sq": u.square()}


def _host_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """Loss, scale ... of CPU tensors or numbers as floats, by name."""
    return {k: float(_local(v.detach()).reshape(-1)[0]) if isinstance(v, torch.Tensor) else float(v)
            for k, v in values.items()}


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

    ``nonfinite`` holds exact counts here.
    """
    collector = GradCollector(named_parameters, include, exclude)
    stats = collector.launch(deep=deep).resolve().grads
    collector.make_exact(stats)
    return stats
