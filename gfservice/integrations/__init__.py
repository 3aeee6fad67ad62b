"""gfservice inside the training frameworks people use: one module per framework, each importable on its own.

- :mod:`gfservice.integrations.transformers`: ``GradflowCallback``, a Hugging Face ``TrainerCallback``;
- :mod:`gfservice.integrations.lightning`: ``GradflowCallback``, a PyTorch Lightning ``Callback``;
- :mod:`gfservice.integrations.accelerate`: ``monitor(accelerator, model, optimizer)`` for an Accelerate loop;
- :mod:`gfservice.integrations.deepspeed`: ``monitor(engine)`` for a DeepSpeed engine (ZeRO 0 to 3).

Each collects once per optimizer step while the gradients are still there, takes the run name from the
framework, and hands a stop verdict (a detector configured with ``stop_run``) to the framework's own stop flag.
Under a process group every rank agrees on the verdict at the same step (:func:`agree_to_stop`), so no rank is
left waiting in a collective. Nothing here imports a framework: only the framework's own module does.
"""

from gfservice.integrations.common import TrainingWatch, agree_to_stop

__all__ = ["TrainingWatch", "agree_to_stop"]
