"""DeepSpeed: a monitor for a ``DeepSpeedEngine``, ZeRO stages 0 to 3, each rank reporting its own partition.

    mon = gfservice.integrations.deepspeed.monitor(engine)
    for batch in loader:
        loss = engine(batch)
        engine.backward(loss)
        mon.step(loss)          # after backward, BEFORE engine.step(): ZeRO frees the gradients in step()
        engine.step()
        if mon.should_stop: break

Under ZeRO the gradients are not in ``.grad``: stages 1 and 2 keep each rank's partition of the reduced
gradients in the optimizer's flat buffers until ``engine.step()``, stage 3 partitions parameters too. Each rank
reads the fragments it owns (``_hp_mapping.get_lp_grad_fragment`` for stages 1-2, the same fragments as
``deepspeed.utils.safe_get_full_grad`` assembles, without its all-reduce; ``deepspeed.utils.safe_get_local_grad``
for stage 3) and reports them as shards: the aggregator adds sums and counts and takes maxima across ranks, so
the merged statistics are exactly those of the full gradients. Stage 0 reads ``.grad`` (replicated).

``mon.step()`` records a step only at a gradient-accumulation boundary (``engine.is_gradient_accumulation_boundary()``),
so it may be called after every ``engine.backward()``. The statistics are of the gradients before clipping (ZeRO
clips inside ``engine.step()``). Weight and update norms on deep steps come from each rank's fp32 master
partition; the update measured at step k is that of step k-1 (the only weights there are when the gradients
are). ``dead_units`` is off in the in-process aggregator here: partitions are flat, not whole rows.
The run name is ``run=``, else gfservice's default (the same on every rank).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from gfservice.integrations.common import TrainingWatch, WatchedLoop

__all__ = ["DeepSpeedMonitor", "ZeroPartition", "local_grad", "monitor"]

_EMPTY = torch.zeros(0)


def local_grad(param: torch.nn.Parameter) -> torch.Tensor | None:
    """This rank's part of ``param``'s gradient under DeepSpeed: a flat fragment under ZeRO (None when the rank
    owns none of it), ``param.grad`` without ZeRO. Valid after ``engine.backward()``, before ``engine.step()``."""
    if hasattr(param, "ds_id"):  # ZeRO-3: the partition of the fp32 gradient this rank owns
        from deepspeed.utils import safe_get_local_grad

        return _unpadded(param, safe_get_local_grad(param))
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:  # no ZeRO (stage 0, or not linked): the ordinary gradient; ZeRO-1/2 unowned: None
        return None if hasattr(param, "_hp_mapping") else param.grad
    fragment = mapping.get_lp_grad_fragment(getattr(param, "_index_in_param_group")).flatten()  # noqa: B009
    address = mapping.lp_fragment_address
    if fragment.numel() == param.numel() and address.numel != param.numel():
        fragment = fragment.narrow(0, address.start, address.numel)  # a full buffer: only the owned fragment
    return fragment


def _unpadded(param: Any, part: torch.Tensor | None) -> torch.Tensor | None:
    """A ZeRO-3 partition without the padding of the last ranks' (every partition has the same size)."""
    if part is None:
        return None
    from deepspeed import comm

    size = param.ds_tensor.ds_numel
    rank = comm.get_rank(group=param.ds_process_group)
    owned = max(0, min(size, int(param.ds_numel) - rank * size))
    flat = part.reshape(-1)
    return flat if owned == flat.numel() else flat.narrow(0, 0, owned)


def local_weight(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's fp32 master partition of ``param`` (``param`` itself without ZeRO)."""
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param

        weights = _unpadded(param, safe_get_local_fp32_param(param))
        return _EMPTY if weights is None else weights
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return _EMPTY if hasattr(param, "_hp_mapping") else param.detach()
    return mapping.get_hp_fragment()


class ZeroPartition:
    """One parameter as gfservice's collector sees it under ZeRO: the full shape and size, this rank's part of
    the gradient as ``.grad`` and of the fp32 weights as ``.detach()``, and a shard flag."""

    requires_grad = True

    def __init__(self, param: torch.nn.Parameter):
        self.param = param
        self.shape = torch.Size(getattr(param, "ds_shape", param.shape))
        # partitioned: ZeRO-3 parameters, and those linked to an fp32 partition (ZeRO-1/2, the bf16 optimizer)
        self.gfservice_sharded = hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")
        self.device = param.device
        self.dtype = param.dtype

    @property
    def gfservice_wraps(self) -> torch.nn.Parameter:
        """The parameter this stands for (:func:`~gfservice.training.module_kinds.layer_kinds` matches by it)."""
        return self.param

    def numel(self) -> int:
        return int(getattr(self.param, "ds_numel", self.param.numel()))

    def is_complex(self) -> bool:
        return self.param.is_complex()

    def is_floating_point(self) -> bool:
        return self.param.is_floating_point()

    @property
    def grad(self) -> torch.Tensor | None:
        return local_grad(self.param)

    def detach(self) -> torch.Tensor:
        return local_weight(self.param)


class _Partitions:
    """What :func:`gfservice.monitor` needs of a model: its named (partitioned) parameters."""

    def __init__(self, module: torch.nn.Module):
        self._module = module
        self._named = [(n, ZeroPartition(p)) for n, p in module.named_parameters() if p.requires_grad]

    def modules(self) -> Iterator[torch.nn.Module]:
        """The engine's modules (their types tell embedding tables: :func:`~gfservice.training.module_kinds`)."""
        return self._module.modules()

    def named_parameters(self) -> Iterator[tuple[str, Any]]:
        return iter(self._named)

    def parameters(self) -> Iterator[Any]:
        return (p for _, p in self._named)


class DeepSpeedMonitor(WatchedLoop):
    """A monitor stepping with a ``DeepSpeedEngine``. Make one with :func:`monitor`."""

    def __init__(self, engine: Any, watch: TrainingWatch):
        super().__init__(watch)
        self.engine = engine

    def step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Record this step at a gradient-accumulation boundary (call after ``engine.backward()``, before
        ``engine.step()``); True when the run must stop (after ``engine.step()``, on every rank alike)."""
        if not self.engine.is_gradient_accumulation_boundary():
            return self.should_stop
        mon = self.monitor
        if mon is not None and mon.guard is not None:  # ZeRO frees the partitions before its optimizer steps
            mon.observe(loss)
            mon.guard_ahead()
        return self._record(loss, self.engine.device)


def monitor(engine: Any, run: str | None = None, *, stop: bool = True, sync_every: int = 1, step: int | None = None,
            **options: Any) -> DeepSpeedMonitor:
    """Watch a ``DeepSpeedEngine``'s gradients, each rank its own partition (every rank must call this).

    ``step`` defaults to the engine's ``global_steps`` (a resumed engine continues its numbering); ``options`` go
    to :func:`gfservice.monitor`.
    """
    model: Any = _Partitions(engine.module)
    if any(p.gfservice_sharded for p in model.parameters()):
        options["detectors"] = {"dead_units": {"enabled": False}, **(options.get("detectors") or {})}
    watch = TrainingWatch(stop=stop, sync_every=sync_every, **options)
    watch.start(model, engine.optimizer, run=run, step=engine.global_steps if step is None else step)
    return DeepSpeedMonitor(engine, watch)
