"""What every framework integration shares: one monitor per training run, a step after each optimizer step, and
a stop verdict that every rank of the job agrees on at the same step.

>>> import torch
>>> model = torch.nn.Linear(4, 1)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> watch = TrainingWatch(service=None)
>>> mon = watch.start(model, opt, run="doc-watch", step=0)
>>> for _ in range(3):
...     model(torch.randn(8, 4)).pow(2).mean().backward(); opt.step()
...     stop = watch.after_optimizer_step(); opt.zero_grad()
>>> watch.close()
>>> stop, mon.latest().step, watch.stopped_at, watch.findings
(False, 2, None, [])
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from gfservice.api import Finding
from gfservice.training.monitoring import Monitor, monitor

log = logging.getLogger(__name__)

#: Agrees on a stop verdict across the ranks of a job: every rank calls it with its own flag at the same step.
Agree = Callable[[bool], bool]


def agree_to_stop(flag: bool, device: torch.device | str | None = None) -> bool:
    """True on every rank when any rank's ``flag`` is true (a one-element all-reduce, MAX, over the default
    process group); ``flag`` itself without an initialised process group of two or more ranks.

    A collective: every rank must call it at the same step. ``device`` is where the flag travels; by default
    the current CUDA device for NCCL, else the CPU.

    >>> agree_to_stop(True), agree_to_stop(False)
    (True, False)
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return bool(flag)
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    box = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item() > 0)


class TrainingWatch:
    """A monitor driven by a framework's hooks: :meth:`start` once, :meth:`after_optimizer_step` once per
    optimizer step (while the gradients are still there), :meth:`close` at the end.

    ``stop`` hands the stop verdict to the framework (``False``: findings only). The verdict is agreed by
    every rank at each ``sync_every``-th collected step (a one-element all-reduce when a process group is
    initialised): every rank stops after the same step. ``options`` go to :func:`gfservice.monitor`
    (``every``, ``deep_every``, ``include``, ``exclude``, ``scaler``, ``config``, ``detectors``, ``service``...).
    """

    def __init__(self, *, stop: bool = True, sync_every: int = 1, **options: Any):
        if sync_every < 1:
            raise ValueError("sync_every must be at least 1")
        self.stop = stop
        self.sync_every = sync_every
        self.options = options
        #: The monitor, from :meth:`start` on (kept after :meth:`close`: its findings stay readable).
        self.monitor: Monitor | None = None
        self.closed = False
        #: The step after which every rank was asked to stop, or None.
        self.stopped_at: int | None = None
        #: Why: the stop reason of the detector that fired (from the rank that saw it; "another rank" else).
        self.stop_reason: str | None = None

    def start(self, model: torch.nn.Module, optimizer: Any, *, run: str | None, step: int) -> Monitor:
        """Make the monitor (every rank must call this: it may agree on names over the process group)."""
        if self.monitor is None or self.closed:
            self.closed = False
            self.stopped_at = self.stop_reason = None
            self.monitor = monitor(model, optimizer, run, step=step, **self.options)
        return self.monitor

    def after_optimizer_step(self, loss: torch.Tensor | float | None = None, agree: Agree | None = None) -> bool:
        """Record the optimizer step that just ran; True when the run must stop now (on every rank alike).

        ``agree`` replaces :func:`agree_to_stop` (e.g. a framework's own boolean all-reduce).
        """
        mon = self.monitor
        if mon is None or self.closed:
            return False
        step = mon.steps
        mon.step(loss=loss)
        if self.stopped_at is not None:
            return True
        if not self.stop or not mon.is_collected(step) or (step // mon.every) % self.sync_every:
            return False
        reason = mon.stop_reason
        stop = (agree or agree_to_stop)(reason is not None)
        if stop:
            self.stopped_at = step
            self.stop_reason = reason or "another rank's monitor asked the run to stop"
            log.warning("gfservice: run %s stops after step %d: %s", mon.run, step, self.stop_reason)
        return stop

    @property
    def findings(self) -> list[Finding]:
        """The run's findings so far (also after :meth:`close`)."""
        return self.monitor.findings if self.monitor is not None else []

    def close(self) -> None:
        """Close the monitor (ships what is in flight); later steps record nothing. Idempotent."""
        if self.monitor is not None and not self.closed:
            self.closed = True
            self.monitor.close()


class WatchedLoop:
    """What a loop-level helper (Accelerate, DeepSpeed) shares: the watch, the agreed verdict, the findings.

    Subclasses decide when a call is an optimizer step and call :meth:`_record` then.
    """

    def __init__(self, watch: TrainingWatch):
        self.watch = watch
        #: True on every rank once the ranks agreed to stop (a detector configured with ``stop_run`` fired).
        self.should_stop = False

    @property
    def monitor(self) -> Monitor | None:
        """The underlying :class:`gfservice.Monitor` (findings, latest, history...); None before it starts."""
        return self.watch.monitor

    @property
    def findings(self) -> list[Finding]:
        return self.watch.findings

    def _record(self, loss: torch.Tensor | float | None, device: Any) -> bool:
        if self.watch.after_optimizer_step(loss, agree=lambda flag: agree_to_stop(flag, device)):
            self.should_stop = True
        return self.should_stop

    def close(self) -> None:
        self.watch.close()

    def __enter__(self: _Loop) -> _Loop:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_Loop = TypeVar("_Loop", bound=WatchedLoop)

