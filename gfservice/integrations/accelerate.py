"""Hugging Face Accelerate: a monitor for a training loop driven by an ``Accelerator``.

    mon = gfservice.integrations.accelerate.monitor(accelerator, model, optimizer)
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss; accelerator.backward(loss); optimizer.step()
            mon.step(loss); optimizer.zero_grad()
        if mon.should_stop: break

``mon.step()`` goes where ``optimizer.step()`` goes and may be called on every micro-batch: it records a step
only when ``accelerator.sync_gradients`` is true (the optimizer really stepped, the gradients are accumulated
and reduced), so under ``gradient_accumulation_steps=N`` it collects once per optimizer step. The statistics are
of the unwrapped model (``accelerator.unwrap_model``: no ``module.`` prefixes; DDP shares its parameters). The
run name is ``run=``, else the last part of ``accelerator.project_dir``, else gfservice's default.
``should_stop`` turns true on every rank after the same step.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator

from gfservice.integrations.common import TrainingWatch, agree_to_stop
from gfservice.training.monitoring import Monitor, _clean_name

__all__ = ["AcceleratedMonitor", "monitor"]


class AcceleratedMonitor:
    """A monitor that steps with an ``Accelerator``'s optimizer steps. Make one with :func:`monitor`."""

    def __init__(self, accelerator: Accelerator, watch: TrainingWatch):
        self.accelerator = accelerator
        self.watch = watch
        #: True on every rank once the ranks agreed to stop (a detector configured with ``stop_run`` fired).
        self.should_stop = False

    @property
    def monitor(self) -> Monitor | None:
        """The underlying :class:`gfservice.Monitor` (findings, latest, history...); None once closed."""
        return self.watch.monitor

    @property
    def findings(self) -> list[Any]:
        mon = self.watch.monitor
        return mon.findings if mon is not None else []

    def step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Record this optimizer step when the gradients were synchronised (else nothing); True to stop."""
        if not self.accelerator.sync_gradients:
            return self.should_stop
        device = self.accelerator.device
        if self.watch.after_optimizer_step(loss, agree=lambda flag: agree_to_stop(flag, device)):
            self.should_stop = True
        return self.should_stop

    def close(self) -> None:
        self.watch.close()

    def __enter__(self) -> AcceleratedMonitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def monitor(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any = None, run: str | None = None, *,
            stop: bool = True, sync_every: int = 1, step: int = 0, **options: Any) -> AcceleratedMonitor:
    """Watch the gradients of the model an ``Accelerator`` prepared (every process must call this).

    ``optimizer`` may be the prepared ``AcceleratedOptimizer``; ``options`` go to :func:`gfservice.monitor`.
    """
    if run is None and accelerator.project_dir:
        run = _clean_name(os.path.basename(os.path.normpath(accelerator.project_dir))) or None
    watch = TrainingWatch(stop=stop, sync_every=sync_every, **options)
    watch.start(accelerator.unwrap_model(model), optimizer, run=run, step=step)
    return AcceleratedMonitor(accelerator, watch)
