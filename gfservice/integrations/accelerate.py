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

from gfservice.integrations.common import TrainingWatch, WatchedLoop
from gfservice.training.monitoring import _clean_name

__all__ = ["AcceleratedMonitor", "monitor"]


class AcceleratedMonitor(WatchedLoop):
    """A monitor that steps with an ``Accelerator``'s optimizer steps. Make one with :func:`monitor`."""

    def __init__(self, accelerator: Accelerator, watch: TrainingWatch):
        super().__init__(watch)
        self.accelerator = accelerator

    def step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Record this optimizer step when the gradients were synchronised (else nothing); True to stop."""
        if not self.accelerator.sync_gradients:
            return self.should_stop
        return self._record(loss, self.accelerator.device)


def monitor(accelerator: Accelerator, model: torch.nn.Module, optimizer: Any = None, run: str | None = None, *,
            stop: bool = True, sync_every: int = 1, step: int = 0, **options: Any) -> AcceleratedMonitor:
    """Watch the gradients of the model an ``Accelerator`` prepared (every process must call this).

    ``optimizer`` may be the prepared ``AcceleratedOptimizer``; ``options`` go to :func:`gfservice.monitor`
    (``guard=True`` guards the torch optimizer inside it: every wrapper's step ends there).
    """
    if run is None and accelerator.project_dir:
        run = _clean_name(os.path.basename(os.path.normpath(accelerator.project_dir))) or None
    watch = TrainingWatch(stop=stop, sync_every=sync_every, **options)
    watch.start(accelerator.unwrap_model(model), optimizer, run=run, step=step)
    return AcceleratedMonitor(accelerator, watch)
