"""PyTorch Lightning: a ``Callback`` that monitors a ``LightningModule``'s gradients.

    from gfservice.integrations.lightning import GradflowCallback
    trainer = lightning.Trainer(callbacks=[GradflowCallback()], ...)
    trainer.fit(module, loader)      # stops on its own when a detector configured with stop_run fires

Collects in ``on_train_batch_end`` of the batches whose optimizer step ran (``trainer.global_step`` moved):
Lightning zeroes the gradients at the start of the next optimizer step, so they are still there, and with
``accumulate_grad_batches=N`` the statistics are taken once per optimizer step, of the accumulated gradients.
The loss is the batch's ``training_step`` loss. The step index is ``trainer.global_step`` before the step.

Manual optimisation (``automatic_optimization = False``): the same rule, a step is collected at the end of each
batch in which an optimizer stepped; call ``opt.zero_grad()`` before ``self.manual_backward(loss)`` (Lightning's
documented order) so the gradients are still there at the end of the batch. With several optimizers the monitor
follows every optimizer (the update norms of all; the learning rate of ``trainer.optimizers[optimizer_index]``)
and every trainable parameter of the module. The gradients are read at the end of backward, before
``gradient_clip_val`` clips them; under ``16-mixed`` the precision plugin's ``GradScaler`` scale is divided out.

The run name is ``run=``, else the logger's ``name`` and ``version`` (``lightning_logs-version_3``), else
gfservice's default; under DDP rank 0's. A stop verdict sets ``trainer.should_stop`` on every rank after the same
step (agreed with the strategy's ``reduce_boolean_decision``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from gfservice.integrations.common import TrainingWatch
from gfservice.training.monitoring import Monitor, _clean_name

__all__ = ["GradflowCallback", "run_name"]


def run_name(trainer: Any) -> str | None:
    """The run name of a Lightning ``Trainer``: its logger's name and version, or None without a logger.

    >>> from types import SimpleNamespace as NS
    >>> run_name(NS(logger=NS(name="lightning_logs", version=3))), run_name(NS(logger=None))
    ('lightning_logs-version_3', None)
    >>> run_name(NS(logger=NS(name="gpt", version="3f9a")))
    'gpt-3f9a'
    """
    logger = getattr(trainer, "logger", None)
    if logger is None:
        return None
    try:
        name, version = logger.name, logger.version
    except Exception:  # a logger that cannot tell (offline, not started): gfservice's default name
        return None
    if version is not None and version != "":
        version = f"version_{version}" if isinstance(version, int) else str(version)
        name = f"{name}-{version}" if name else version
    return _clean_name(str(name or "")) or None


def _loss(outputs: Any) -> torch.Tensor | float | None:
    if isinstance(outputs, Mapping):
        outputs = outputs.get("loss")
    return outputs if isinstance(outputs, (torch.Tensor, float)) else None


class GradflowCallback(pl.Callback):
    """Monitors a ``LightningModule``'s gradients; stops the ``Trainer`` when a detector with ``stop_run`` fires.

    ``run`` overrides the run name; ``stop=False`` only reports findings; ``sync_every`` thins out the ranks'
    agreement on the stop verdict; ``optimizer_index`` picks the optimizer watched under manual optimisation;
    other keywords go to :func:`gfservice.monitor` (``every``, ``deep_every``, ``detectors``, ``service``...).
    """

    def __init__(self, run: str | None = None, *, stop: bool = True, sync_every: int = 1, optimizer_index: int = 0,
                 **options: Any):
        self.run = run
        self.optimizer_index = optimizer_index
        self.watch = TrainingWatch(stop=stop, sync_every=sync_every, **options)
        self._optimizer_steps = 0

    @property
    def monitor(self) -> Monitor | None:
        """The monitor of the last fit (None before it starts; kept, closed, after it ends)."""
        return self.watch.monitor

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self.run or run_name(trainer)
        if trainer.world_size > 1:  # loggers may resolve their version per rank: rank 0's name for all
            run = trainer.strategy.broadcast(run, src=0)
        optimizers = list(trainer.optimizers)
        if len(optimizers) > self.optimizer_index:  # the chosen one first (its learning rate), then the others
            optimizers.insert(0, optimizers.pop(self.optimizer_index))
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        if scaler is not None:  # 16-mixed: the gradients read at the end of backward carry its scale
            self.watch.options.setdefault("scaler", scaler)
        self._optimizer_steps = trainer.global_step
        self.watch.start(pl_module, optimizers or None, run=run, step=trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._optimizer_steps:  # accumulating: no optimizer step in this batch
            return
        self._optimizer_steps = trainer.global_step
        agree = trainer.strategy.reduce_boolean_decision
        if self.watch.after_optimizer_step(_loss(outputs), agree=lambda flag: agree(flag, all=False)):
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.watch.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.watch.close()
