"""Hugging Face Transformers: a ``TrainerCallback`` that monitors the ``Trainer``'s gradients.

    from gfservice.integrations.transformers import GradflowCallback
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[GradflowCallback()])
    trainer.train()      # stops on its own when a detector configured with stop_run fires

Collects in ``on_optimizer_step`` (after ``optimizer.step()``, before the gradients are zeroed), once per
optimizer step whatever ``gradient_accumulation_steps`` is; the step index is ``state.global_step``. The run
name is ``run=``, else ``args.run_name``, else the last part of ``args.output_dir`` (but for the default one).
A stop verdict sets ``control.should_training_stop`` on every rank after the same step. The Trainer's optimizer
is Accelerate's ``AcceleratedOptimizer``; the monitor hooks the torch optimizer inside it. The loss is not handed
to callbacks, so a forward hook on the model keeps the ``loss`` of its output: the step's last micro-batch's.

The Trainer clips the gradients (``max_grad_norm``, default 1.0) before any callback runs; the monitor reads them
earlier, at the end of backward, so the statistics are those before clipping (the global norm is the
``grad_norm`` the Trainer logs). Under ``fp16`` the ``AcceleratedOptimizer``'s ``GradScaler`` is found and its
scale divided out.

Ray Train: ``ray.train.huggingface.transformers.prepare_trainer(trainer)`` only swaps the Trainer's data loaders
(for Ray Data; its ``RayTrainReportCallback`` is added separately), so ``GradflowCallback`` works unchanged
inside ``train_loop_per_worker``, next to Ray's callback: every worker finds the service (``service="auto"``)
and learns its rank from the process group Ray Train set up. Leave ``run_name`` unset and keep the default
``output_dir`` there to name the run after the Ray Train experiment.

DeepSpeed under the Trainer (``args.deepspeed``): ZeRO keeps the gradients in the engine, not in ``.grad``; use
:mod:`gfservice.integrations.deepspeed` in a loop of your own (the monitor warns when it sees no gradient).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gfservice.integrations.common import TrainingWatch
from gfservice.training.monitoring import Monitor, _clean_name

__all__ = ["GradflowCallback", "run_name"]


#: The ``output_dir`` a ``Trainer`` gets when none is given: it names no run.
_DEFAULT_OUTPUT_DIR = "trainer_output"


def run_name(args: TrainingArguments) -> str | None:
    """The run name a ``Trainer`` run goes by: ``args.run_name``, else the last part of ``args.output_dir``
    unless it is the default one; None then (gfservice's default name: ``$GFSERVICE_RUN``, Ray Train's
    experiment, torchrun's or Slurm's job, else a generated one).

    >>> from types import SimpleNamespace as NS
    >>> run_name(NS(run_name=None, output_dir="/ckpt/gpt2-small/")), run_name(NS(run_name="exp 7", output_dir="x"))
    ('gpt2-small', 'exp-7')
    >>> run_name(NS(run_name=None, output_dir="trainer_output")) is None
    True
    """
    name = getattr(args, "run_name", None)
    if not name:
        name = os.path.basename(os.path.normpath(getattr(args, "output_dir", "") or ""))
        name = "" if name == _DEFAULT_OUTPUT_DIR else name
    return _clean_name(str(name)) or None


class GradflowCallback(TrainerCallback):
    """Monitors a ``Trainer``'s gradients; stops the training when a detector with ``stop_run`` fires.

    ``run`` overrides the run name; ``stop=False`` only reports findings; ``sync_every`` thins out the ranks'
    agreement on the stop verdict (one all-reduce of one element per collected step by default); other keywords
    go to :func:`gfservice.monitor` (``every``, ``deep_every``, ``detectors``, ``config``, ``service``,
    ``guard``...). With ``guard=True`` a poisoned step (NaN/Inf gradients or loss, a gradient-norm explosion)
    leaves the weights and the optimizer state untouched: the guard wraps the torch optimizer inside the
    ``AcceleratedOptimizer``, and the learning-rate schedule goes on as after a GradScaler's skipped step.
    """

    def __init__(self, run: str | None = None, *, stop: bool = True, sync_every: int = 1, **options: Any):
        self.run = run
        self.watch = TrainingWatch(stop=stop, sync_every=sync_every, **options)
        self._loss: Any = None
        self._loss_hook: Any = None

    @property
    def monitor(self) -> Monitor | None:
        """The monitor of the last training run (None before ``train()``; kept, closed, after it ends)."""
        return self.watch.monitor

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: Any = None, optimizer: Any = None, **kwargs: Any) -> None:
        self.watch.start(model, optimizer, run=self.run or run_name(args), step=state.global_step)
        if model is not None and self._loss_hook is None:
            self._loss_hook = model.register_forward_hook(self._keep_loss)

    def _keep_loss(self, module: Any, inputs: Any, output: Any) -> None:
        """Keep the loss a forward pass returned (a reference: no copy, no device sync)."""
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is not None and hasattr(loss, "detach"):
            self._loss = loss.detach()
            mon = self.watch.monitor
            if mon is not None and mon.guard is not None:
                mon.observe(self._loss)  # the guard judges a NaN/Inf loss before optimizer.step()

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        loss, self._loss = self._loss, None
        if self.watch.after_optimizer_step(loss):
            control.should_training_stop = True

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:
        if self._loss_hook is not None:
            self._loss_hook.remove()
            self._loss_hook = None
        self._loss = None
        self.watch.close()
