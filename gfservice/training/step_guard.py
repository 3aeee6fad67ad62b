"""The guard's hands on the training loop: what it reads of a step's gradients (made the same on every rank of a
sharded job by :func:`agree`), and ``optimizer.step`` made skippable.

:func:`wrap_step` puts a bound method in front of an optimizer's ``step`` (the way ``GradScaler`` decides
whether ``optimizer.step()`` runs): ``decide()`` is asked first and the step runs, or does nothing and returns
None. A learning-rate scheduler made before or after sees what it expects: ``optimizer._opt_called`` is set
on a skipped step too, and a scheduler's ``_wrapped_by_lr_sched`` mark is kept, so it neither warns nor falls
out of step (a skipped step counts as a step, as under ``GradScaler``).

>>> import torch
>>> model = torch.nn.Linear(2, 1)
>>> opt = torch.optim.SGD(model.parameters(), lr=1.0)
>>> handle = wrap_step(opt, lambda: "skip")
>>> model(torch.ones(1, 2)).sum().backward()
>>> before = model.weight.detach().clone()
>>> opt.step(); torch.equal(model.weight, before), opt._opt_called
(True, True)
>>> handle.remove(); opt.step(); torch.equal(model.weight, before)
False
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from gfservice.training.collect import GradRead
from gfservice.training.parameters import local_part

__all__ = ["GuardInput", "OnDevice", "StepHandle", "agree", "guard_input", "judge_on_device", "rescale",
           "shard_norm", "wrap_step"]


class GuardInput(NamedTuple):
    """What the guard judges of one step's gradients, on the host."""

    norm: float
    #: Some gradient value is NaN/Inf.
    nonfinite: bool
    #: Every layer's norm (0 without a gradient).
    layer_norms: np.ndarray
    #: Every layer's sum of squares (loss scale divided out; what :func:`agree` adds up across ranks).
    sums: np.ndarray | None = None


def guard_input(read: GradRead, layers: int) -> GuardInput:
    """The global norm, NaN/Inf flag and layer norms of ``read`` (loss scale divided out). On CUDA this is the
    one small device-to-host copy the guard costs per step.

    >>> import torch, numpy as np
    >>> r = GradRead(torch.tensor([9.0, 16.0], dtype=torch.float64), [0, 2], np.array([3, 0, 4]), False, False)
    >>> g = guard_input(r, 3); g.norm, g.nonfinite, g.layer_norms.tolist(), g.sums.tolist()
    (5.0, False, [3.0, 0.0, 4.0], [9.0, 0.0, 16.0])
    """
    n = len(read.have)
    head = read.vector[: 2 * n if read.peak else n].detach()
    host = head.cpu().numpy() if head.device.type != "cpu" else head.numpy()
    sums = host[:n].astype(np.float64)
    scale = 1.0 if read.scale is None else float(read.scale)
    if read.nonfinite is not None:
        bad = bool(read.nonfinite.any())
    elif read.peak:
        bad = not bool(np.isfinite(host[n: 2 * n]).all())
    else:
        bad = not bool(np.isfinite(sums).all())
    return _from_sums(sums, read.have, layers, bad, scale)


def _from_sums(sums: np.ndarray, have: Sequence[int], layers: int, bad: bool, scale: float = 1.0) -> GuardInput:
    """The guard's input from the sums of squares of the layers ``have`` (``bad``: some value is NaN/Inf)."""
    norms = np.zeros(layers, np.float64)
    squares = np.zeros(layers, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        norms[have] = np.sqrt(sums) / scale
        squares[have] = sums / (scale * scale)
        total = math.sqrt(float(sums.sum())) / scale if not bad else float("nan")
    return GuardInput(total, bad, norms, squares)


class OnDevice(NamedTuple):
    """A step judged on its gradients' device (:func:`judge_on_device`), its summary on the way to the host."""

    step: int
    #: 1.0 where the step is poisoned, else 0.0: a 0-dim float32 tensor on the gradients' device, what a fused
    #: optimizer's ``found_inf`` takes.
    poisoned: torch.Tensor
    #: [sum of squares, NaN/Inf in the gradients, NaN/Inf loss, poisoned, each read layer's sum of squares]
    #: (float64, on the host once :meth:`ready`).
    summary: torch.Tensor
    #: The layers of the summary's sums.
    have: list[int]
    #: The norm the step was judged against (None: before warm-up, only NaN/Inf counted).
    limit: float | None
    #: The learning rate of the step (what the guard's history keeps).
    lr: float | None
    #: A CUDA event recorded after the copy to the host (None: the summary is on the host already).
    event: Any = None

    def ready(self) -> bool:
        """Whether the summary has landed on the host (never waits)."""
        return self.event is None or bool(self.event.query())

    def resolve(self, layers: int) -> tuple[GuardInput, bool, bool]:
        """The guard's input, whether the step was poisoned and whether its loss was NaN/Inf (waits for the copy
        where it has not landed)."""
        if self.event is not None:
            self.event.synchronize()
        host = self.summary.numpy()
        bad, loss_bad, poisoned = bool(host[1]), bool(host[2]), bool(host[3])
        return _from_sums(host[4:], self.have, layers, bad or not math.isfinite(host[0])), poisoned, loss_bad


def _flag(value: bool, device: torch.device) -> torch.Tensor:
    """A 0-dim bool tensor on ``device`` made by a fill there (``torch.tensor(..., device=)`` would copy from the
    host, and on CUDA wait for the stream)."""
    return torch.full((), value, dtype=torch.bool, device=device)


def judge_on_device(step: int, read: GradRead, limit: float | None, loss: torch.Tensor | float | None = None,
                    lr: float | None = None) -> OnDevice:
    """The guard's verdict on ``read`` computed where the gradients are, with no host sync: poisoned when some
    gradient value (or the loss) is NaN/Inf or the global sum of squares (loss scale divided out) exceeds
    ``limit**2``. The summary starts its copy to the host (CUDA: pinned memory, asynchronous).

    >>> r = GradRead(torch.tensor([9.0, 16.0], dtype=torch.float64), [0, 2], np.array([3, 0, 4]), False, False)
    >>> d = judge_on_device(7, r, limit=4.0); d.poisoned, d.ready()
    (tensor(1.), True)
    >>> got, poisoned, loss_bad = d.resolve(3); got.norm, got.layer_norms.tolist(), poisoned, loss_bad
    (5.0, [3.0, 0.0, 4.0], True, False)
    >>> bool(judge_on_device(7, r, limit=None, loss=torch.tensor(float("nan"))).poisoned)
    True
    """
    n = len(read.have)
    vector = read.vector.detach()
    device = vector.device
    sums = vector[:n].to(torch.float64)
    if isinstance(read.scale, torch.Tensor):
        scale = read.scale.to(device, torch.float64)
        sums = sums / (scale * scale)
    elif read.scale is not None:
        sums = sums / (float(read.scale) ** 2)
    total = sums.sum()
    if read.nonfinite is not None:  # exact counts read on the host already (CPU)
        bad = _flag(bool(read.nonfinite.any()), device)
    elif read.peak:
        bad = ~torch.isfinite(vector[n: 2 * n]).all()
    else:
        bad = ~torch.isfinite(sums).all()
    bad = bad | ~torch.isfinite(total)
    if isinstance(loss, torch.Tensor):
        loss_bad = ~torch.isfinite(loss.detach().reshape(-1)[0]).to(device)
    else:
        loss_bad = _flag(loss is not None and not math.isfinite(loss), device)
    poisoned = bad | loss_bad
    if limit is not None:
        poisoned = poisoned | (total > limit * limit)
    summary = torch.cat([torch.stack([total, bad.double(), loss_bad.double(), poisoned.double()]), sums])
    event = None
    if device.type == "cuda":
        host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
        host.copy_(summary, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        summary = host
    elif device.type != "cpu":
        summary = summary.cpu()  # another accelerator: a plain copy (it waits)
    return OnDevice(step, poisoned.to(torch.float32), summary, list(read.have), limit, lr, event)


def agree(got: GuardInput, sharded: Sequence[bool], loss: float | None = None, *, layers: bool = False,
          device: torch.device | None = None, reduce: Callable[[torch.Tensor], Any] | None = None,
          world: int | None = None) -> tuple[GuardInput, float | None]:
    """``got`` (this rank's shard) made global and the same on every rank of a sharded job (FSDP2, DeepSpeed
    ZeRO), with the loss: ONE all-reduce (SUM) over the default process group of [the sum of squares of the
    ``sharded`` layers, 1/world of the other layers' (the same on every rank where they are replicated), the
    NaN/Inf flag, the loss's NaN/Inf flag], and with ``layers`` each layer's sum (the per-layer rule). This is
    what ``clip_grad_norm_`` does for FSDP. A flag summed is > 0 where any rank's is set (a MAX); a NaN sum stays
    NaN. Every rank receives the same numbers, so every rank's guard keeps the same history and decides the same.
    Returns the global input and a loss that is NaN where some rank's loss is NaN/Inf, else None.

    ``device``: where the gradients are (the reduction goes there, except on a gloo-only group); ``reduce`` (in
    place) and ``world`` stand in for ``torch.distributed.all_reduce`` and the group's size: here two ranks that
    hold the same shard of a sharded layer and a replicated one.

    >>> g = GuardInput(5.0, False, np.array([3.0, 4.0]), np.array([9.0, 16.0]))
    >>> def two_ranks(t): t.mul_(2)
    >>> both, loss = agree(g, [True, False], float("nan"), layers=True, reduce=two_ranks, world=2)
    >>> round(both.norm ** 2, 6), both.nonfinite, both.layer_norms.tolist(), loss
    (34.0, False, [4.242640687119285, 4.0], nan)
    """
    if reduce is None:
        import torch.distributed as dist

        world = dist.get_world_size()
        if device is None or device.type == "cpu" or str(dist.get_backend()) == "gloo":
            device = torch.device("cpu")
        reduce = dist.all_reduce
    world = world or 1
    sums = got.sums if got.sums is not None else got.layer_norms ** 2
    mask = np.asarray(sharded, bool)
    share = np.where(mask, sums, sums / world)
    loss_bad = loss is not None and not math.isfinite(loss)
    with np.errstate(invalid="ignore", over="ignore"):
        head = [float(share[mask].sum()), float(share[~mask].sum()), float(got.nonfinite), float(loss_bad)]
    vector = torch.tensor(head + (share.tolist() if layers else []), dtype=torch.float64, device=device)
    reduce(vector)
    host = vector.cpu().numpy() if vector.device.type != "cpu" else vector.numpy()
    total = float(host[0] + host[1])
    bad = bool(host[2] > 0) or not math.isfinite(total)
    with np.errstate(invalid="ignore"):
        layer_norms = np.sqrt(host[4:]) if layers else got.layer_norms
    norm = math.sqrt(total) if not bad else float("nan")
    return GuardInput(norm, bad, layer_norms, host[4:] if layers else None), \
        (float("nan") if host[3] > 0 else None)


def shard_norm(sums: np.ndarray, sharded: Sequence[bool], device: torch.device | None = None) -> float:
    """The global gradient norm of a sharded job from this rank's per-layer sums of squares (:func:`agree`: a
    collective every rank must call)."""
    return agree(GuardInput(0.0, False, np.sqrt(sums), sums), sharded, device=device)[0].norm


def rescale(params: Sequence[torch.Tensor], limit: float,
            combine: Callable[[np.ndarray], float] | None = None) -> float:
    """Scale the gradients of ``params`` in place so that their global norm is at most ``limit``; returns the
    factor (1.0: nothing to do). The norm is read as the gradients are now (after any clipping of the user's).
    ``combine``: the global norm from this rank's per-parameter sums of squares (a sharded job's
    :func:`agree`); the gradients' local shards are scaled.

    >>> p = torch.nn.Parameter(torch.zeros(2)); p.grad = torch.tensor([3.0, 4.0])
    >>> rescale([p], 1.0), p.grad.tolist()
    (0.2, [0.6000000238418579, 0.800000011920929])
    >>> p.grad = torch.tensor([3.0, 4.0]); rescale([p], 1.0, combine=lambda sums: 2 * math.sqrt(sums.sum()))
    0.1
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 1.0
    with torch.no_grad():
        if combine is None:
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64)
                                                               for g in grads])))
        else:
            sums = np.zeros(len(params), np.float64)
            for i, p in enumerate(params):
                if p.grad is not None:
                    sums[i] = float(torch.linalg.vector_norm(local_part(p.grad), dtype=torch.float64)) ** 2
            grads = [local_part(g) for g in grads]
            norm = combine(sums)
        if not math.isfinite(norm) or norm <= limit:
            return 1.0
        factor = limit / norm
        torch._foreach_mul_(grads, factor)
    return factor


class StepHandle:
    """Takes the wrapper off again (:meth:`remove`), where nothing wrapped ``step`` after it."""

    def __init__(self, optimizer: Any, wrapper: Any, had_own: bool, previous: Any):
        self._optimizer, self._wrapper, self._had_own, self._previous = optimizer, wrapper, had_own, previous
        #: False once removed: a wrapper that another one wraps since stays, passing every step through.
        self.active = True

    def remove(self) -> None:
        self.active = False
        opt = self._optimizer
        if opt.__dict__.get("step") is self._wrapper:
            if self._had_own:
                opt.step = self._previous
            else:
                del opt.step


def _step_with_found_inf(opt: Any, poisoned: torch.Tensor, step: Callable[..., Any], *args: Any,
                         **kwargs: Any) -> Any:
    """Run the optimizer's real ``step`` with ``found_inf`` set to ``poisoned`` (a fused optimizer leaves its
    parameters and state as they were where it is 1), then put back what was there: nothing, or the
    ``found_inf`` of a GradScaler the monitor was not given (then both count: the larger)."""
    had = "found_inf" in opt.__dict__
    theirs = opt.__dict__.get("found_inf")
    mine = torch.maximum(theirs, poisoned.to(theirs.device)) if isinstance(theirs, torch.Tensor) else poisoned
    opt.found_inf = mine
    try:
        return step(*args, **kwargs)
    finally:
        if had:
            opt.found_inf = theirs
        elif opt.__dict__.get("found_inf") is mine:
            del opt.found_inf


def wrap_step(optimizer: Any, decide: Callable[[], str | torch.Tensor | None],
              before: Callable[[Callable[[], Any]], Any] | None = None) -> StepHandle:
    """Ask ``decide()`` before each ``optimizer.step()``: ``"skip"`` makes it a no-op (returns None); a tensor
    runs the step with it as the optimizer's ``found_inf`` (a fused optimizer's skip, decided on the device).

    A step given a closure (Lightning runs the training step and backward inside ``optimizer.step(closure)``)
    runs the closure first, then decides, then steps with a closure that hands back that first result (and runs
    the real one on later calls, as LBFGS makes). ``before(closure)``, when given, runs the closure instead
    (the monitor notes its loss).
    """
    had_own = "step" in optimizer.__dict__
    previous = optimizer.step
    handle: StepHandle

    def guarded(opt: Any, *args: Any, **kwargs: Any) -> Any:
        if not handle.active:
            return previous(*args, **kwargs)
        closure = kwargs.get("closure", args[0] if args else None)
        if closure is not None:
            with torch.enable_grad():
                first = before(closure) if before is not None else closure()
            calls = [first]

            def replay() -> Any:
                return calls.pop() if calls else closure()

            if "closure" in kwargs:
                kwargs["closure"] = replay
            else:
                args = (replay, *args[1:])
        decision = decide()
        if isinstance(decision, torch.Tensor):  # a device-side verdict: the fused optimizer skips it itself
            return _step_with_found_inf(opt, decision, previous, *args, **kwargs)
        if decision == "skip":
            opt._opt_called = True  # what a learning-rate scheduler checks: a skipped step is a step taken
            return first if closure is not None else None
        return previous(*args, **kwargs)

    if getattr(previous, "_wrapped_by_lr_sched", False):
        # a scheduler wrapped step() before us: keep its mark, or it warns that step() was overridden
        guarded._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    wrapper = types.MethodType(guarded, optimizer)
    optimizer.step = wrapper
    handle = StepHandle(optimizer, wrapper, had_own, previous)
    return handle
