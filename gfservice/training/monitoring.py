"""The two lines in a training loop: ``monitor = gfservice.monitor(model, optimizer)`` and ``monitor.step()``.

>>> import torch, gfservice
>>> model = torch.nn.Linear(4, 1)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> mon = gfservice.monitor(model, opt, run="doc", service=None)
>>> for _ in range(3):
...     loss = model(torch.randn(8, 4)).pow(2).mean()
...     loss.backward(); opt.step(); mon.step(loss=loss); opt.zero_grad()
>>> mon.latest().step, mon.findings, mon.should_stop
(2, [], False)
>>> mon.close()
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field

from gfservice.api import Finding, Severity, StepStats
from gfservice.config import load_settings
from gfservice.service.aggregator import Aggregator
from gfservice.training.backward import BackwardTap, can_tap
from gfservice.training.collect import Collected, GradCollector, GradRead, Pending
from gfservice.training.ddp_hook import LocalNormHook, is_ddp
from gfservice.training.guard import REASONS, Guard, GuardConfig, Verdict, guard_config
from gfservice.training.module_kinds import layer_kinds
from gfservice.training.names import safe_names
from gfservice.training.optim_info import RunContext, largest_lr
from gfservice.training.parameters import has_sharded_parameters, local_part
from gfservice.training.shipper import Shipper
from gfservice.training.step_guard import (
    OnDevice,
    StepHandle,
    agree,
    guard_input,
    judge_on_device,
    rescale,
    shard_norm,
    wrap_step,
)
from gfservice.training.transport import HANDOFF_WAIT_S, InProcessTransport, Transport
from gfservice.training.watch import Sink, Watch, make_sinks
from gfservice.wire import Layout, RunEnd, StepReport

log = logging.getLogger(__name__)

#: Seconds ``monitor.close()`` waits at most for the service to take the last reports.
CLOSE_TIMEOUT_S = 5.0

#: Collected steps whose device-to-host copy may still be in flight before ``monitor.step()`` waits for the
#: oldest (a CPU that runs this many steps ahead of its GPU).
MAX_IN_FLIGHT = 8


_BAD_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.:\-]+")


def _clean_name(text: str) -> str:
    """``text`` as a valid run name or attempt id: other characters become ``-``, at most 128 characters."""
    return _BAD_NAME_CHARS.sub("-", text.strip()).strip("-")[:128]


def _ray_train_context() -> Any:
    """Ray Train's context when this process is a Ray Train worker (and has imported Ray already), else None."""
    if "ray" not in sys.modules:
        return None
    try:
        import ray.train

        ctx = ray.train.get_context()
        ctx.get_world_size()  # raises outside a Ray Train worker
        return ctx
    except Exception:
        return None


def _torchelastic_run_id() -> str:
    """``$TORCHELASTIC_RUN_ID`` when it names this job (torchrun's default ``none`` does not)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return "" if run_id.lower() in ("", "none") else run_id


def _process_group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def _from_rank_0(value: str) -> str:
    """Rank 0's ``value`` on every rank (a collective: every rank of the process group must call it)."""
    box: list[Any] = [value]
    try:
        torch.distributed.broadcast_object_list(box, src=0)
    except Exception:  # never fail the training job: this rank keeps its own value
        log.warning("gfservice: could not take rank 0's run name or attempt id; using this rank's", exc_info=True)
        return value
    return str(box[0])


def default_run_name() -> str:
    """The run name when none is given: the same on every rank of one job, and different between jobs.

    ``$GFSERVICE_RUN``, else the Ray Train experiment name, else ``$TORCHELASTIC_RUN_ID`` (torchrun), else
    ``slurm-$SLURM_JOB_ID`` (with ``.$SLURM_STEP_ID``), else rank 0's generated name when a process group is
    initialised (sent to the other ranks: a collective), else a generated one: the start time and a random
    suffix, e.g. ``run-20261130-121500-3f9a``.
    """
    for name in (os.environ.get("GFSERVICE_RUN", ""), _ray_experiment_name(), _torchelastic_run_id()):
        if _clean_name(name):
            return _clean_name(name)
    job = os.environ.get("SLURM_JOB_ID", "")
    if _clean_name(job):
        step = os.environ.get("SLURM_STEP_ID", "")
        return _clean_name(f"slurm-{job}" + (f".{step}" if step else ""))
    generated = time.strftime("run-%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    return _from_rank_0(generated) if _process_group() else generated


def _ray_experiment_name() -> str:
    ctx = _ray_train_context()
    try:
        return str(ctx.get_experiment_name() or "") if ctx is not None else ""
    except Exception:
        return ""


def _ray_train_attempt() -> str:
    """An id of this start of the Ray Train worker group: the training run's id and the worker group's (a new
    group, with a new synchronization actor, on every restart after a failure). Ray Train v2 only; else ""."""
    if _ray_train_context() is None:
        return ""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        internal = get_train_context()
        group = getattr(internal.execution_context.synchronization_actor, "_actor_id").hex()  # noqa: B009
        return f"{internal.train_run_context.run_id[:12]}.{group[:12]}"
    except Exception:
        return ""


def attempt_id() -> str:
    """The id of this start (attempt) of the job, the same on all its ranks and new on each restart.

    Under Ray Train: its run id and worker group (new on every restart). Under torchrun:
    ``$TORCHELASTIC_RUN_ID`` and ``$TORCHELASTIC_RESTART_COUNT``. Else rank 0's random id, sent to the other
    ranks when a process group is initialised (a collective), else a random id.
    """
    ray_attempt = _clean_name(_ray_train_attempt())
    if ray_attempt:
        return ray_attempt
    elastic = _torchelastic_run_id()
    if elastic and "TORCHELASTIC_RESTART_COUNT" in os.environ:
        return _clean_name(f"{elastic[:100]}.{os.environ['TORCHELASTIC_RESTART_COUNT']}")
    fresh = secrets.token_hex(6)
    return _clean_name(_from_rank_0(fresh)) if _process_group() else fresh


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process: torch.distributed, else Ray Train's context, else (0, 1).

    Ray is asked only when this process has imported it already (a Ray Train worker has): a monitor never
    imports Ray on its own.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    ctx = _ray_train_context()
    if ctx is not None:
        try:
            return ctx.get_world_rank(), ctx.get_world_size()
        except Exception:
            pass
    return 0, 1


def torch_optimizer(optimizer: Any) -> Any:
    """``optimizer``, or the torch optimizer it wraps (Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``, DeepSpeed's ZeRO optimizers: ``.optimizer`` or ``._optimizer``); None when there is
    none with step hooks.
    """
    seen: set[int] = set()
    inner = optimizer
    while inner is not None and id(inner) not in seen:
        seen.add(id(inner))
        if isinstance(getattr(inner, "_optimizer_step_pre_hooks", None), dict):
            return inner
        inner = getattr(inner, "optimizer", None) or getattr(inner, "_optimizer", None)
    return None


def _register_step_pre_hook(optimizer: Any, hook: Any) -> Any:
    """``hook`` before each step of ``optimizer``, or of the torch optimizer it wraps (:func:`torch_optimizer`).
    None, logged, when there is none: the weight and update norms are then not collected.
    """
    inner = torch_optimizer(optimizer)
    if inner is not None:
        return inner.register_step_pre_hook(hook)
    log.info("gfservice: %s has no optimizer step hook; weight and update norms are not collected",
             type(optimizer).__name__)
    return None


def optimizer_list(optimizer: Any) -> list[Any]:
    """The optimizers a monitor follows: none, one, or several (a list or tuple: GANs, one per sub-model).

    >>> optimizer_list(None), optimizer_list([1, 2])
    ([], [1, 2])
    """
    if optimizer is None:
        return []
    return list(optimizer) if isinstance(optimizer, list | tuple) else [optimizer]


def held_parameters(optimizers: Sequence[Any]) -> set[int]:
    """``id()`` of every parameter the optimizers hold: frozen ones among them may be unfrozen later."""
    held: set[int] = set()
    for opt in optimizers:
        for group in getattr(torch_optimizer(opt) or opt, "param_groups", None) or ():
            held.update(id(p) for p in group.get("params", ()))
    return held


class MonitorOptions(BaseModel):
    """What a :class:`Monitor` collects, how often, and which rank of which run and attempt it speaks for.

    :func:`gfservice.monitor` fills them in from its keywords and the process it runs in.

    >>> MonitorOptions(run="exp", every=2, include=["encoder.*"]).include
    ('encoder.*',)
    >>> MonitorOptions(run="exp", every=0)
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for MonitorOptions
    every
      Input should be greater than or equal to 1 [type=greater_than_equal, input_value=0, input_type=int]
    ...
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    run: str
    #: This start of the run, shared by its ranks (see :func:`attempt_id`).
    attempt: str = ""
    #: Collect every ``every``-th step.
    every: int = Field(1, ge=1)
    #: Deep statistics (and weight and update norms) every ``deep_every``-th step; 0: never.
    deep_every: int = Field(50, ge=0)
    #: Globs of the parameter names watched (all when empty), and of those left out.
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    rank: int = 0
    world_size: int = 1
    #: Whether this rank reports its layers (False: a heartbeat with its own norm, as DDP ranks other than 0).
    reports_layers: bool = True
    #: The index of the first step (a job resumed from a checkpoint at step N continues at N).
    step: int = Field(0, ge=0)


class _InFlight(NamedTuple):
    """A collected step on its way to the host, with what the monitor read when it was collected."""

    step: int
    pending: Pending
    #: ``time.time()`` at collection.
    time: float
    lr: float | None
    #: Wall-clock seconds since the previous collected step (None at the first).
    step_time: float | None
    #: Seconds from the end of the previous ``monitor.step()`` to this step's first DDP bucket (None without).
    compute_time: float | None


class Monitor:
    """Collects gradient statistics every ``options.every`` steps (deep ones every ``options.deep_every``) and
    ships them through ``transport``.

    Use :func:`gfservice.monitor` to make one. ``step()`` is the only call in the training loop; it
    never raises because of monitoring (errors are logged and counted in ``errors``). ``scaler``: the AMP
    grad scaler whose loss scale is reported; ``local_norm_hook``: the DDP hook of this rank's own norm;
    ``sinks``: where rank 0 also sends its findings (see :mod:`gfservice.training.watch`); ``guard``: judge each
    step before ``optimizer.step()`` and skip (or clip) poisoned ones (see :mod:`gfservice.training.guard`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
        transport: Transport,
        options: MonitorOptions,
        *,
        scaler: Any = None,
        local_norm_hook: LocalNormHook | None = None,
        sinks: Sequence[str | Sink] = (),
        guard: GuardConfig | None = None,
    ):
        self.options = options
        self.run = options.run
        #: This start of the run (shared by its ranks; see :func:`attempt_id`).
        self.attempt = options.attempt
        self.every = options.every
        self.deep_every = options.deep_every
        self.rank = options.rank
        self.world_size = options.world_size
        self.transport = transport
        #: Every optimizer followed (weight snapshots before each, on deep steps); the first gives the learning rate.
        self.optimizers = optimizer_list(optimizer)
        self.optimizer = self.optimizers[0] if self.optimizers else None
        # a GradScaler passed, or the one an optimizer wrapper holds (Accelerate's AcceleratedOptimizer)
        self.scaler = scaler if scaler is not None else next(
            (s for s in (getattr(o, "scaler", None) for o in self.optimizers) if s is not None), None)
        self.reports_layers = options.reports_layers
        self.local_norm_hook = local_norm_hook
        self.steps = options.step  # index of the next step: ``step`` plus the monitor.step() calls so far
        self._last_end: float | None = None  # perf_counter() when the previous monitor.step() returned
        self.errors = 0
        #: Why this monitor records nothing (it could not start; logged once), or None.
        self.off: str | None = None
        #: Original names of the layers whose names were made wire-safe (:mod:`gfservice.training.names`).
        self.display_names: dict[str, str] = {}
        self.overhead_s = 0.0  # time spent inside the monitor's own calls and hooks
        self._last_scale: float | None = None
        self._last_time: float | None = None
        #: Collected steps whose copy to the host has not been shipped yet, oldest first (CUDA: the copies land
        #: while training goes on; CPU: at most the step being collected).
        self._in_flight: deque[_InFlight] = deque()
        self._hooks = [h for h in (_register_step_pre_hook(o, self._before_optimizer_step)
                                   for o in (self.optimizers if self.deep_every else ())) if h is not None]
        self._snapshot_step: int | None = None  # the step whose weights were kept (once, before its first optimizer)
        self._warned_no_gradient = False
        self._watch: Watch | None = None
        # pre-clip collection: the gradients are read at the end of the backward of each synchronising micro-step
        # (see _end_of_backward); monitor.step() reads them itself when no backward was seen
        self._ddp = model if is_ddp(model) else None
        self._early: GradRead | None = None
        self._backwards = 0  # synchronising backwards since the last monitor.step()
        self._expected_backwards = 1  # at the previous step: the read waits for as many
        self.tap: BackwardTap | None = None
        self._wire_layers: list[str] = []
        self._context_at: dict[int, dict[str, Any]] = {}  # what RunContext read of each step in flight
        #: The guard of this run (``guard=``), or None.
        self.guard: Guard | None = Guard(guard) if guard is not None else None
        #: The steps whose optimizer step the guard skipped, with the reason of each (``nonfinite_gradient``,
        #: ``nonfinite_loss``, ``gradient_norm``, ``layer_norm``).
        self.skipped_steps: list[tuple[int, str]] = []
        #: With ``GuardConfig(policy="clip")``: the steps whose gradients the guard rescaled, with the reason.
        self.clipped_steps: list[tuple[int, str]] = []
        self._guard_read: tuple[int, GradRead] | None = None  # this step's gradients at the end of backward
        # the step decided, and what was done (a tensor: the found_inf of a verdict on the device)
        self._guard_done: tuple[int, str | torch.Tensor | None] | None = None
        #: A verdict taken ahead (:meth:`guard_ahead`): (the step whose optimizer step it is for, the decision).
        self._guard_early: tuple[int, str | torch.Tensor | None] | None = None
        self._guard_on_device = False  # every guarded optimizer takes a device-side found_inf (fused)
        self._guard_pending: deque[OnDevice] = deque()  # verdicts on the device not yet settled on the host
        self._guard_loss: Any = None  # monitor.observe(loss) of this step
        self._guard_findings: list[Finding] = []
        self._guard_stop: str | None = None
        self._guard_handles: list[StepHandle] = []
        #: Builds and sends the step reports off the training thread (see :meth:`_ship`).
        self._shipper = Shipper(self._error, name=f"gfservice-ship-{self.run}")
        feeders = getattr(transport, "feeders", None)
        if isinstance(feeders, list):  # the in-process transport's flush hands over what the shipper holds first
            feeders.append(lambda: self._shipper.wait(CLOSE_TIMEOUT_S))
        try:  # a model, a name or a service the monitor cannot take leaves the job training, unmonitored
            self.collector = GradCollector(model.named_parameters(), options.include, options.exclude,
                                           held=held_parameters(self.optimizers))
            self._synchronous = self.collector.params[0].device.type == "cpu"
            self.run, self._wire_layers, self.display_names = safe_names(self.run, self.collector.layers)
            if (self.reports_layers or self.guard is not None) and all(can_tap(p) for p in self.collector.params):
                self.tap = BackwardTap(self.collector.params, self._end_of_backward)
            if self.guard is not None:
                self._guard_handles = self._wrap_steps()
            self._kinds = layer_kinds(model, self.collector.params) if self.reports_layers else []
            self._context = RunContext(self.optimizers or None, self.collector.params)
            self.layout = self._make_layout()
            self.transport.send(self.layout)
            if self.collector.frozen():
                log.info("gfservice: run %s: %d frozen layers the optimizer holds are watched without gradient "
                         "until unfrozen (requires_grad is followed)", self.run, len(self.collector.frozen()))
            self._watch = self._start_watch(sinks) if self.rank == 0 else None
        except Exception as exc:
            self.errors += 1
            self.off = f"{type(exc).__name__}: {exc}"
            log.error("gfservice: cannot monitor run %s (%s); training goes on unmonitored. Report this with the "
                      "model's parameter names and dtypes, or pass include=/exclude= to leave out what it cannot "
                      "take.", self.run, self.off[:500], exc_info=True)

    def _make_layout(self) -> Layout:
        """This rank's layout: its layers, with units 0 for the frozen ones (not judged)."""
        reports_layers = self.reports_layers
        return Layout(
            run=self.run,
            attempt=self.attempt,
            rank=self.rank,
            world_size=self.world_size,
            layers=list(self._wire_layers) if reports_layers else [],
            numel=self.collector.numel if reports_layers else [],
            sharded=self.collector.sharded if reports_layers else [],
            units=self.collector.live_units() if reports_layers else [],
            kinds=self._kinds if reports_layers else [],
            reports_layers=reports_layers,
        )

    def _follow_requires_grad(self) -> None:
        """Send a new layout when layers were frozen or unfrozen (``requires_grad``) since the last look: frozen
        layers keep their place without gradient (count 0) and units 0, so no detector judges them."""
        before = set(self.collector.frozen())
        if not self.collector.refresh_live():
            return
        after = set(self.collector.frozen())
        log.info("gfservice: run %s: requires_grad changed: %s; frozen layers are reported without gradient and "
                 "not judged", self.run, "; ".join(
                     f"{what} {', '.join(sorted(names)[:5])}{' ...' if len(names) > 5 else ''}"
                     for what, names in (("frozen", after - before), ("unfrozen", before - after)) if names))
        if self.tap is not None:
            self.tap.widen()
        self.layout = layout = self._make_layout()
        self._shipper.put(lambda: self.transport.send(layout), droppable=False)  # after the reports before it

    def _start_watch(self, sinks: Sequence[str | Sink]) -> Watch:
        """Rank 0 logs findings as they open and clear, and feeds the sinks, off the training thread."""
        run, transport = self.run, self.transport
        agg = transport.aggregator
        if agg is not None:  # in this process: every merged step, cheaply
            def source() -> tuple[Sequence[StepStats], Sequence[Finding]]:
                return agg.history(run), agg.findings(run)
            interval = 1.0
        else:  # a service: the latest step, every few seconds
            def source() -> tuple[Sequence[StepStats], Sequence[Finding]]:
                latest = transport.latest(run)
                return ([latest] if latest is not None else []), transport.findings(run)
            interval = 5.0
        return Watch(run, source, make_sinks(sinks, run), interval_s=interval).start()

    # ---- the training loop's calls --------------------------------------------------------------
    def is_collected(self, step: int) -> bool:
        return step % self.every == 0

    def is_deep(self, step: int) -> bool:
        return bool(self.deep_every) and self.is_collected(step) and step % self.deep_every == 0

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
        t0 = time.perf_counter()
        try:  # once per step: with several optimizers the update counts from before the first
            if self.is_deep(self.steps) and self.reports_layers and self._snapshot_step != self.steps:
                self.collector.snapshot_weights()
                self._snapshot_step = self.steps
        except Exception:
            self._error("weight snapshot")
        self.overhead_s += time.perf_counter() - t0

    def _end_of_backward(self) -> None:
        """Read the gradients of the step under way now, before anything clips or unscales them.

        Only synchronising micro-steps count (under DDP ``no_sync()`` the gradients are partial), and with
        gradient accumulation only the last backward before ``monitor.step()`` matters: the read waits for as many
        backwards as the previous step had, and any later backward reads again (the last one wins).
        """
        t0 = time.perf_counter()
        try:
            if self._ddp is not None and not getattr(self._ddp, "require_backward_grad_sync", True):
                return
            self._backwards += 1
            step = self.steps
            wanted = self.reports_layers and self.is_collected(step)
            if self._backwards < self._expected_backwards or not (wanted or self.guard is not None):
                return
            read = self.collector.read(deep=wanted and self.is_deep(step), scale=self._grad_scale())
            if self._synchronous:  # exact NaN/Inf counts and maxima now: clipping may spread NaN to every layer
                read = self.collector.exact(read)
            if wanted:
                self._early = read
            if self.guard is not None:  # the guard judges these gradients before optimizer.step()
                self._guard_read = (step, read)
            if self.tap is not None:
                self.tap.narrow(read.have)
        except Exception:
            self._error("end of backward")
        finally:
            self.overhead_s += time.perf_counter() - t0

    def _grad_scale(self) -> torch.Tensor | None:
        """The loss scale the gradients carry at the end of backward (an enabled GradScaler's), else None."""
        scaler = self.scaler
        if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
            return None
        return getattr(scaler, "_scale", None)

    # ---- the guard ------------------------------------------------------------------------------
    def _wrap_steps(self) -> list[StepHandle]:
        """The guard in front of ``step()`` of every optimizer followed (the torch optimizer a wrapper holds:
        the one every wrapper's step ends in)."""
        if not self.optimizers:
            log.warning("gfservice: run %s: guard= needs the optimizer (gfservice.monitor(model, optimizer, ...)); "
                        "no step is guarded", self.run)
        seen: dict[int, Any] = {}
        for opt in self.optimizers:
            target = torch_optimizer(opt) or opt
            seen.setdefault(id(target), target)
        self._guard_on_device = bool(seen) and all(getattr(t, "_step_supports_amp_scaling", False)
                                                   for t in seen.values())
        return [wrap_step(t, self._guard_decide, self._guard_closure) for t in seen.values()]

    def observe(self, loss: torch.Tensor | float | None) -> None:
        """Give the guard this step's loss before ``optimizer.step()``: a NaN/Inf loss makes the step poisoned.
        (Under DDP the verdict uses the all-reduced gradients only, the same on every rank: a rank's loss is its
        own. Under FSDP and DeepSpeed ZeRO a NaN/Inf loss on any rank poisons the step on every rank.)"""
        self._guard_loss = loss

    def _guard_closure(self, closure: Callable[[], Any]) -> Any:
        """Run an optimizer closure (training step and backward) for the guard, noting the loss it returns."""
        out = closure()
        if isinstance(out, torch.Tensor | float):
            self._guard_loss = out
        return out

    def _guard_decide(self) -> str | torch.Tensor | None:
        """``"skip"`` when the guard keeps this step off the weights (else None; a tensor: the ``found_inf`` a
        fused optimizer skips by itself); called by ``optimizer.step()``. Never raises: a guard error lets the
        step run (counted in ``errors``)."""
        t0 = time.perf_counter()
        try:
            early = self._guard_early
            if early is not None and early[0] == self.steps:
                return early[1]
            return self._guard_action()
        except Exception:
            self._error("guard")
            return None
        finally:
            self.overhead_s += time.perf_counter() - t0

    def guard_ahead(self) -> None:
        """Take the guard's verdict now, on the gradients as they are, for the optimizer step that comes right after
        the next ``monitor.step()`` (labelled with this step). For loops whose gradients are gone by the time the
        optimizer steps: DeepSpeed ZeRO moves its gradient partitions into its fp32 groups and frees them first
        (the DeepSpeed helper calls this). Every rank must call it (a sharded verdict is agreed with one
        all-reduce). Never raises."""
        t0 = time.perf_counter()
        try:
            self._guard_early = (self.steps + 1, self._guard_action())  # monitor.step() comes first
        except Exception:
            self._error("guard")
        finally:
            self.overhead_s += time.perf_counter() - t0

    def _guard_loss_seen(self) -> torch.Tensor | float | None:
        loss = self._guard_loss
        if loss is None or (self.world_size > 1 and not self.reports_layers) or self._ddp is not None:
            return None  # under DDP the verdict comes from the all-reduced gradients alone: the same on every rank
        return loss

    def _loss_for_guard(self) -> float | None:
        loss = self._guard_loss_seen()
        return float(loss.detach().reshape(-1)[0]) if isinstance(loss, torch.Tensor) else loss

    def _guard_shards(self) -> bool:
        """Whether the guard judges shards that must be made global (:func:`agree`): some collected parameter is
        sharded (FSDP2, DeepSpeed ZeRO) and a process group of several ranks is initialised."""
        return any(self.collector.sharded) and _process_group()

    def _guard_action(self) -> str | torch.Tensor | None:
        guard, step = self.guard, self.steps
        if guard is None or self.off is not None:
            return None
        if self._guard_done is not None and self._guard_done[0] == step:  # several optimizers: decided once
            return self._guard_done[1]
        seen = self._guard_read
        if seen is not None and seen[0] == step:
            read = seen[1]
        else:  # no end of backward seen: read the gradients as they are now
            read = self.collector.read(scale=self._grad_scale())
            if self._synchronous:
                read = self.collector.exact(read)
        self._guard_done = (step, None)
        lr = largest_lr(self.optimizers)
        if self._device_verdict_fits(lr):
            judged = judge_on_device(step, read, guard.limit_norm(), self._guard_loss_seen(), lr)
            self._guard_pending.append(judged)
            self._guard_done = (step, judged.poisoned)
            try:
                self._settle_on_host()  # on CPU the verdict is on the host already
            except Exception:  # the books, not the verdict: the optimizer still skips a poisoned step
                self._error("guard")
            return judged.poisoned
        got = guard_input(read, len(self.collector))
        loss = self._loss_for_guard()
        shards = self._guard_shards()
        if shards:  # every rank judges the same global numbers: one tiny all-reduce
            got, loss = agree(got, self.collector.sharded, loss, layers=guard.config.per_layer,
                              device=local_part(self.collector.params[0]).device)
        if got.nonfinite and self._grad_scale() is not None:
            return None  # an fp16 overflow: the GradScaler skips this step and lowers its scale itself
        verdict = guard.verdict(got.norm, nonfinite=got.nonfinite, loss=loss, layer_norms=got.layer_norms, lr=lr)
        decision = guard.settle(step, verdict, got.layer_norms, lr)
        if decision.exhausted:
            self._guard_exhausted(step, verdict)
        if not decision.act:
            return None
        reason = verdict.reason or "gradient_norm"
        if reason == "learning_rate":
            self.skipped_steps.append((step, reason))
            self._guard_done = (step, "skip")
            log.warning("gfservice guard: run %s step %d skipped (learning_rate): learning rate %.3g, more than %gx "
                        "the largest the run used so far; parameters and optimizer state untouched", self.run, step,
                        lr, guard.config.lr_ratio)
            return "skip"
        if guard.config.policy == "clip" and reason == "gradient_norm" and verdict.limit is not None:
            device = local_part(self.collector.params[0]).device
            combine = (lambda sums: shard_norm(sums, self.collector.sharded, device)) if shards else None
            factor = rescale(list(self.collector.params), verdict.limit, combine)
            self.clipped_steps.append((step, reason))
            self._guard_done = (step, "clip")
            log.warning("gfservice guard: run %s step %d: gradient norm %.3g above the guard's %.3g: gradients "
                        "rescaled by %.3g", self.run, step, verdict.norm, verdict.limit, factor)
            return "clip"
        self._guard_done = (step, "skip")
        self._guard_skipped(step, verdict)
        return "skip"

    def _guard_skipped(self, step: int, verdict: Verdict) -> None:
        reason = verdict.reason or "gradient_norm"
        self.skipped_steps.append((step, reason))
        log.warning("gfservice guard: run %s step %d skipped (%s): gradient norm %.3g%s; parameters and optimizer "
                    "state untouched", self.run, step, reason, verdict.norm,
                    "" if verdict.limit is None else f" against the guard's limit {verdict.limit:.3g}")

    def _device_verdict_fits(self, lr: float | None) -> bool:
        """Whether this step is judged on the gradients' device (:func:`judge_on_device`): fused optimizers, no
        active GradScaler (it sets ``found_inf`` itself), policy ``skip``, no per-layer rule, nothing sharded, no
        learning-rate jump (judged on the host, with no sync), and the guard's patience not at its end (a verdict
        that lets a poisoned step through is taken on the host)."""
        guard = self.guard
        if guard is None or not self._guard_on_device:
            return False
        cfg = guard.config
        if (not cfg.device_verdict or cfg.policy != "skip" or cfg.per_layer or self._grad_scale() is not None
                or any(self.collector.sharded) or guard.lr_jump(lr)):
            return False
        self._settle_on_host()
        if guard.consecutive + len(self._guard_pending) >= cfg.max_consecutive:
            self._settle_on_host(wait=True)  # only after poisoned steps in a row: how many must be known
        return guard.consecutive < cfg.max_consecutive

    def _settle_on_host(self, wait: bool = False) -> None:
        """Enter the verdicts taken on the device into the guard's books, oldest first, once their summaries are
        on the host (``wait``: all of them): its history, consecutive count, ``skipped_steps`` and log line."""
        guard, pending = self.guard, self._guard_pending
        while guard is not None and pending and (wait or pending[0].ready()):
            judged = pending.popleft()
            got, poisoned, loss_bad = judged.resolve(len(self.collector))
            reason: Any = ("nonfinite_gradient" if got.nonfinite else "nonfinite_loss" if loss_bad
                           else "gradient_norm") if poisoned else None
            verdict = Verdict(poisoned, reason, got.norm, judged.limit)
            if guard.settle(judged.step, verdict, got.layer_norms, judged.lr).act:
                self._guard_skipped(judged.step, verdict)

    def _guard_exhausted(self, step: int, verdict: Verdict) -> None:
        """``max_consecutive`` poisoned steps in a row: the guard lets this one through and raises a critical
        finding (and with ``stop_run`` asks the run to stop)."""
        cfg = self.guard.config if self.guard is not None else GuardConfig()
        message = (f"the guard judged {cfg.max_consecutive + 1} steps in a row poisoned (last: {verdict.reason}, "
                   f"gradient norm {verdict.norm:.3g}); it stops skipping and lets step {step} through. A run that "
                   "only produces poisoned steps needs a person: check the data, the learning rate and the last "
                   "checkpoint")
        log.critical("gfservice guard: run %s: %s", self.run, message)
        self._guard_findings.append(Finding(
            detector="guard", severity=Severity.critical, run=self.run, step=step, message=message, key="exhausted",
            value=verdict.norm if math.isfinite(verdict.norm) else None, threshold=verdict.limit))
        if cfg.stop_run:
            self._guard_stop = f"guard: {message}"

    def _guard_counts(self) -> dict[str, int] | None:
        """Steps skipped so far by reason (every reason, 0 included), or None without a guard."""
        if self.guard is None:
            return None
        counts = dict.fromkeys(REASONS, 0)
        for _, reason in self.skipped_steps:
            counts[reason] = counts.get(reason, 0) + 1
        return counts

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Record the step that just ran (call after ``optimizer.step()``, before ``zero_grad()``)."""
        t0 = time.perf_counter()
        step = self.steps
        self.steps += 1
        self._guard_loss = None
        if self.off is not None:
            return
        if self._guard_pending:
            try:
                self._settle_on_host()  # the device verdicts whose summaries have landed
            except Exception:
                self._error("guard")
        early, self._early = self._early, None
        if self._backwards:
            self._expected_backwards, self._backwards = self._backwards, 0
        if self.tap is not None:
            self.tap.queued = False  # a backward that raised never reached its end
        try:
            self._finish_in_flight(wait=False)  # ship the earlier steps whose copies have landed: never waits
            if self.is_collected(step):
                self._collect(step, loss, early)
                if self._synchronous:  # on CPU the copy is done: ship now, with exact NaN counts
                    self._finish_in_flight(exact=True)
        except Exception:
            self._error(f"step {step}")
        self._last_end = time.perf_counter()
        self.overhead_s += self._last_end - t0

    def _collect(self, step: int, loss: torch.Tensor | float | None, early: GradRead | None = None) -> None:
        now = time.time()
        scale = self._grad_scale()
        lr = None
        groups = getattr(self.optimizer, "param_groups", None)  # any optimizer wrapper: it may have none
        if groups:
            lr_v = groups[0].get("lr")
            # a learning rate held in a device tensor (capturable optimizers) would cost a host sync: not read
            on_device = isinstance(lr_v, torch.Tensor) and lr_v.device.type != "cpu"
            lr = float(lr_v) if lr_v is not None and not on_device else None
        deep = self.is_deep(step) and self.reports_layers
        hook = self.local_norm_hook
        local_sq = hook.take() if hook is not None else None
        first_bucket = hook.take_first_bucket_time() if hook is not None else None
        self._context_at[step] = self._context.fields(deep)
        if self.guard is not None:
            self._context_at[step]["guard_skips"] = self._guard_counts()
        if early is None:  # no end of backward seen (gradients set by hand, DeepSpeed ZeRO): read them now
            early = self.collector.read(deep=deep, layers=self.reports_layers)
            if self.tap is not None and self.tap.narrowed:
                self.tap.widen()
        pending = self.collector.finish(early, extras={"loss": loss, "loss_scale": scale, "local_sq": local_sq})
        self._in_flight.append(_InFlight(
            step, pending, now, lr,
            # the wall clock may step back (NTP): a negative step time would get the whole report refused
            None if self._last_time is None else max(0.0, now - self._last_time),
            None if first_bucket is None or self._last_end is None else first_bucket - self._last_end,
        ))
        self._last_time = now

    def _finish_in_flight(self, exact: bool = False, wait: bool = True) -> None:
        """Ship the collected steps in flight, oldest first: all of them, or with ``wait=False`` those whose
        copy has landed (and the oldest ones beyond :data:`MAX_IN_FLIGHT`, the only case that waits)."""
        while self._in_flight:
            oldest = self._in_flight[0]
            if not wait and len(self._in_flight) <= MAX_IN_FLIGHT and not oldest.pending.ready():
                return
            self._in_flight.popleft()
            self._ship(oldest, exact)

    def _ship(self, collected: _InFlight, exact: bool) -> None:
        """Ship a collected step whose copy has landed. On the training thread only what needs the gradients
        (``exact``: exact NaN/Inf counts when the read was not exact; ``requires_grad`` when a layer had no
        gradient) and the wait that keeps the verdicts at most one step late; unpacking, the report and the send
        run on the shipper's thread."""
        pending = collected.pending
        if (exact and not pending.exact) or not self._synchronous:
            got = pending.resolve()
            if exact and not got.exact:
                self.collector.make_exact(got.grads)
            missing = not got.grads.count.all() or not got.grads.sum_sq.all()
        else:
            missing = pending.some_layer_without_gradient()
        if self.reports_layers and (missing or self.is_deep(collected.step)):
            self._follow_requires_grad()  # a layer without gradient: frozen or unfrozen since?
        self._hand_over()
        self._shipper.put(lambda: self._send_report(collected))

    def _hand_over(self) -> None:
        """With an in-process aggregator: wait (bounded, as its ``send`` would) until the previous step is judged,
        so that ``should_stop`` is at most one step late. The usual step finds it judged long ago."""
        hand_off = getattr(self.transport, "hand_off", None)
        if hand_off is None:
            return
        shipper = self._shipper
        if shipper.pending and (shipper.pending > 1 or not shipper.wait(HANDOFF_WAIT_S)):
            return  # the shipper is behind: no wait (the transport counts late sends itself)
        hand_off()

    def _send_report(self, collected: _InFlight) -> None:
        """Unpack a collected step, build its report and send it (on the shipper's thread)."""
        got = collected.pending.resolve()
        if not self._warned_no_gradient and self.reports_layers:
            self._warn_if_no_gradient(collected.step, got.grads)
        self.transport.send(self._report(collected, got))

    def _warn_if_no_gradient(self, step: int, g: Any) -> None:
        """Log once when no layer has a gradient at a collected step: the monitor is misplaced or blind.

        The ``no_gradient`` detector turns the same symptom into a finding (key ``all``) after its window.
        """
        if g.sum_sq.any() or g.nonfinite.any() or (g.max_abs is not None and g.max_abs.any()):
            return  # some layer has a non-zero gradient (a layer without one has a count and sums of 0)
        self._warned_no_gradient = True
        what = "no layer has a gradient (.grad is None)" if not g.count.any() else "every gradient is exactly zero"
        log.warning(
            "gfservice: run %s step %d: %s at monitor.step(). Call monitor.step() after optimizer.step() and "
            "before optimizer.zero_grad() (with gradient accumulation: once per optimizer step, after the last "
            "micro-batch). Under DeepSpeed ZeRO the gradients live in the engine: use "
            "gfservice.integrations.deepspeed. Logged once; the no_gradient detector reports it as a finding.",
            self.run, step, what)

    def _report(self, collected: _InFlight, got: Collected) -> StepReport:
        x = got.extras
        g = got.grads
        local_sq = x["local_sq"]
        if local_sq is None:  # no allreduce hook ran: this rank's gradients are its local ones
            local_bad = bool(g.nonfinite.any()) if self.reports_layers else False
            local_norm = g.global_norm if self.reports_layers and not local_bad else None
        else:
            local_bad = not math.isfinite(local_sq)
            local_norm = None if local_bad else math.sqrt(local_sq)
        scale = x["loss_scale"]
        skipped = False
        if scale is not None:
            skipped = self._last_scale is not None and scale < self._last_scale
            self._last_scale = scale
        # Built without validation: these values come from our own collection; whoever receives the report
        # (the service, or the aggregator in this process) validates it at its boundary.
        return StepReport.model_construct(
            run=self.run,
            attempt=self.attempt,
            rank=self.rank,
            step=collected.step,
            time=collected.time,
            stats=g.arrays() if self.reports_layers else {},
            loss=x["loss"],
            lr=collected.lr,
            loss_scale=scale,
            skipped=skipped,
            local_norm=local_norm if local_norm is not None and math.isfinite(local_norm) else None,
            local_nonfinite=local_bad,
            step_time=collected.step_time,
            compute_time=collected.compute_time if collected.compute_time is None or collected.compute_time >= 0
            else None,
            monitor_errors=self.errors,
            **self._context_at.pop(collected.step, {}),
        )

    def _error(self, where: str) -> None:
        self.errors += 1
        if self.errors <= 3 or self.errors % 1000 == 0:
            log.exception("gfservice monitor: %s failed (%d errors so far, in monitor.errors); training continues. "
                          "If it repeats, report it with this trace, or leave the layers out (exclude=)", where,
                          self.errors)

    def _ask(self, what: str, question: Callable[[], Any], otherwise: Any) -> Any:
        """``question()``, or ``otherwise`` (the error counted and logged) when the transport fails."""
        try:
            return question()
        except Exception:
            self._error(what)
            return otherwise

    # ---- what the loop can ask ------------------------------------------------------------------
    @property
    def findings(self) -> list[Finding]:
        """Findings of this run so far (from the service or the in-process aggregator, and the guard's own)."""
        return self._ask("findings", lambda: self.transport.findings(self.run), []) + self._guard_findings

    @property
    def stop_reason(self) -> str | None:
        """Why a detector (or the guard) configured with ``stop_run`` asks this run to stop, or ``None``."""
        if self._guard_stop is not None:
            return self._guard_stop
        return self._ask("stop verdict", lambda: self.transport.stop_reason(self.run), None)

    @property
    def should_stop(self) -> bool:
        """True once a detector configured to stop the run has fired; never blocks. At most one step late: the
        detectors judge step N off the training thread while step N+1 trains."""
        return self.stop_reason is not None

    def latest(self) -> StepStats | None:
        """The last merged step of this run, where the transport can tell."""
        return self._ask("latest step", lambda: self.transport.latest(self.run), None)

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Ship what is still in flight and release hooks; the monitor records nothing afterwards.

        Returns within ``timeout_s`` (default :data:`CLOSE_TIMEOUT_S`) even when the service is gone: what was
        not delivered by then is logged (and counted in ``errors``), and delivery goes on in the background
        while the process lives."""
        t0 = time.monotonic()
        try:
            if self.off is None:
                self._settle_on_host(wait=True)  # the guard's last verdicts taken on the device
                self._finish_in_flight()
                end = RunEnd(run=self.run, rank=self.rank, attempt=self.attempt)
                self._shipper.put(lambda: self.transport.send(end), droppable=False)
        except Exception:
            self._error("close")
        for h in self._hooks:
            h.remove()
        self._hooks = []
        for g in self._guard_handles:
            g.remove()
        self._guard_handles = []
        if self.tap is not None:
            self.tap.close()
            self.tap = None
        watch, self._watch = self._watch, None

        shipper = self._shipper

        def shut() -> None:
            shipper.close(timeout_s)
            self._ask("close", self.transport.close, None)
            if watch is not None:
                self._ask("close", watch.close, None)

        closer = threading.Thread(target=shut, name=f"gfservice-close-{self.run}", daemon=True)
        closer.start()
        closer.join(max(0.0, timeout_s - (time.monotonic() - t0)))
        if closer.is_alive():
            self.errors += 1
            queued = len(getattr(self.transport, "_queue", ()) or ())
            log.warning("gfservice: monitor.close() gave up after %.1f s: the service did not take the run's last "
                        "reports (%d still queued, %d dropped before, and the end of run %s rank %d may be "
                        "missing; the service takes the run as over after its idle limit). Delivery goes on in "
                        "the background while this process lives.", timeout_s, queued,
                        getattr(self.transport, "dropped", 0), self.run, self.rank)

    # ---- in a notebook --------------------------------------------------------------------------
    def history(self, per_layer: bool = False) -> list[dict[str, Any]]:
        """The run's merged steps as rows, ready for ``pandas.DataFrame(monitor.history())``.

        One row per step (step, time, loss, lr, loss_scale, grad_norm, max_abs, nonfinite, and with a guard
        ``guard_skip``: why the guard skipped that step's update, or None), or with
        ``per_layer=True`` one row per step and layer (step, layer, norm, rms, max_abs, nonfinite, count).
        ``max_abs`` is ``None`` at steps that did not read it (CPU core steps: see :class:`~gfservice.GradStats`).
        From the in-process aggregator every merged step it keeps; from a service, its history of the run.
        """
        steps = self._merged_steps()
        if per_layer:
            shown = self.display_names
            return [{"step": s.step, "layer": shown.get(name, name), "norm": float(norm), "rms": float(rms),
                     "max_abs": None if s.grads.max_abs is None else float(s.grads.max_abs[i]),
                     "nonfinite": int(bad), "count": int(cnt)}
                    for s in steps
                    for i, (name, norm, rms, bad, cnt) in enumerate(zip(s.layers, s.grads.norm, s.grads.rms,
                                                                        s.grads.nonfinite, s.grads.count, strict=True))]
        rows: list[dict[str, Any]] = [
                {"step": s.step, "time": s.time, "loss": s.loss, "lr": s.lr, "loss_scale": s.loss_scale,
                 "grad_norm": float(s.global_norm) if len(s.layers) else None,
                 "max_abs": float(s.grads.max_abs.max()) if len(s.layers) and s.grads.max_abs is not None else None,
                 "nonfinite": int(s.grads.nonfinite.sum())} for s in steps]
        if self.guard is not None:
            skipped = dict(self.skipped_steps)
            for row in rows:
                row["guard_skip"] = skipped.get(row["step"])
        return rows

    def _merged_steps(self) -> list[StepStats]:
        """The merged steps the transport can read, once the reports the shipper holds were handed to it (at most
        :data:`CLOSE_TIMEOUT_S`; steps still in flight on the GPU are left to ``monitor.step()``)."""
        def read() -> list[StepStats]:
            self._shipper.wait(CLOSE_TIMEOUT_S)
            return self.transport.history(self.run)
        return self._ask("history", read, [])

    def plot(self) -> Any:
        """A matplotlib figure of the gradient flow so far (per-layer RMS over steps, findings marked)."""
        from gfservice.observability.report import figure

        return figure(self._merged_steps(), self.findings)

    def _repr_png_(self) -> bytes | None:
        """Shown inline by Jupyter when the monitor is the value of a cell."""
        from gfservice.observability.report import png_bytes

        steps = self._merged_steps()
        return png_bytes(steps, self.findings) if steps else None

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def monitor(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
    run: str | None = None,
    *,
    every: int = 1,
    deep_every: int = 50,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    scaler: Any = None,
    config: str | os.PathLike | None = None,
    detectors: dict[str, dict[str, Any]] | None = None,
    service: str | None = "auto",
    step: int = 0,
    sinks: Sequence[str | Sink] | None = None,
    guard: bool | str | GuardConfig | None = None,
) -> Monitor:
    """Watch ``model``'s gradients during training.

    ``service="auto"`` ships statistics to a running gfservice service when one is reachable; with
    ``service=None``, or when none is found, an in-process aggregator runs the detectors (chosen by
    ``config``, a TOML/YAML file, and ``detectors``, name -> field overrides). Under torchrun or Slurm (a
    process group of 2+ ranks) that aggregator runs on rank 0 for every rank of the job, which send to it on
    their own TCP connections (see :mod:`gfservice.training.peer_sender`).

    Every call starts a new attempt of the run (a restarted or resubmitted job under the same run name is
    monitored afresh: see :func:`attempt_id`). ``step`` is the index of the first step: a job resumed from a
    checkpoint at step N passes ``step=N`` to continue its run's step numbers. Rank 0 logs every finding
    as it opens and clears (logger ``gfservice.findings``) and feeds ``sinks`` (``"tensorboard[:DIR]"``,
    ``"wandb"``, ``"mlflow"`` or sink objects; default: ``sinks`` of the configuration), see
    :mod:`gfservice.training.watch`. Without a ``run``, the name is
    the same on every rank of one job (see :func:`default_run_name`). When a process group is initialised,
    every rank must call this (it may send rank 0's run name or attempt id to the others).

    ``guard`` (``True``, ``"skip"``, ``"clip"`` or a :class:`~gfservice.training.guard.GuardConfig`) judges
    every step's pre-clip gradients before ``optimizer.step()``: a step with NaN/Inf gradients (or loss, given
    to ``monitor.observe(loss)`` before the step) or a gradient norm far above the run's own recent history is
    skipped (parameters and optimizer state untouched) or, with ``"clip"``, its gradients rescaled. See
    ``monitor.skipped_steps`` and ``docs/howto/guard.md``.
    """
    guard_cfg = guard_config(guard)  # a bad value raises here, before anything starts
    run = run or default_run_name()
    attempt = attempt_id()
    rank, world = distributed_rank()
    settings = load_settings(config) if config else load_settings(data={})
    transport: Transport | None = None
    if service is not None:
        from gfservice.training.transport import connect_service

        transport = connect_service(service, run=run)
    if transport is None:
        det = {name: {**settings.detectors.get(name, {}), **(fields or {})}
               for name, fields in {**settings.detectors, **(detectors or {})}.items()}
        if _process_group():  # torchrun or Slurm without a service: rank 0 aggregates the job's ranks
            from gfservice.training.peer_sender import connect_peers

            transport = connect_peers(run, attempt, settings.model_copy(update={"detectors": det}))
        if transport is None:
            transport = InProcessTransport(Aggregator(settings.aggregator, det))
            rank, world = 0, 1  # an in-process aggregator sees only this process
    # DDP ranks hold identical reduced gradients: one rank reports the layers, every rank a heartbeat with
    # its own pre-allreduce norm. Sharded (FSDP2) ranks each report their shard.
    reports_layers = True
    hook = None
    if world > 1 and is_ddp(model):
        reports_layers = rank == 0
        hook = LocalNormHook.install(model)
    elif world > 1 and not has_sharded_parameters(model):
        reports_layers = rank == 0
    options = MonitorOptions(run=run, attempt=attempt, every=every, deep_every=deep_every, include=tuple(include),
                             exclude=tuple(exclude), rank=rank, world_size=world, reports_layers=reports_layers,
                             step=step)
    return Monitor(model, optimizer, transport, options, scaler=scaler, local_norm_hook=hook,
                   sinks=settings.sinks if sinks is None else sinks, guard=guard_cfg)
