"""Small shared helpers for tests: MLPs of a given depth, activation and initialisation, a real data set, a loop.

The data set is scikit-learn's digits (1797 8x8 images, shipped with the package, nothing downloaded),
standardised. Everything runs on CPU in a second or two.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(depth: int, width: int = 32, activation: str = "relu", init: str = "he", n_in: int = 64, n_out: int = 10,
        seed: int = 0) -> nn.Sequential:
    """An MLP with ``depth`` Linear layers (``depth - 1`` hidden ones of ``width``).

    ``init``: ``"he"`` (kaiming normal for ReLU, zero biases), ``"uniform"`` (U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for weights and biases, the classic init under which deep sigmoid nets vanish), or ``"default"`` (torch's).
    Layer names are ``"0.weight"``, ``"0.bias"``, ``"2.weight"``, ... (input to output).
    """
    torch.manual_seed(seed)
    dims = [n_in] + [width] * (depth - 1) + [n_out]
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(dims[i], dims[i + 1])
        if init == "he":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        elif init == "uniform":
            bound = 1.0 / math.sqrt(dims[i])
            nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.uniform_(lin.bias, -bound, bound)
        elif init != "default":
            raise ValueError(f"unknown init {init!r}")
        layers.append(lin)
        if i < depth - 1:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def linear_names(model: nn.Sequential) -> list[str]:
    """Parameter names of ``model`` in depth order."""
    return [n for n, _ in model.named_parameters()]


@cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(axis=0)) / (x.std(axis=0) + 1e-6)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised digits features (1797, 64) and labels (1797,)."""
    x, y = _digits()
    return x.clone(), y.clone()


def batches(batch_size: int = 32, seed: int = 0):
    """An endless iterator of shuffled (x, y) mini-batches of the digits data."""
    x, y = _digits()
    rng = np.random.default_rng(seed)
    while True:
        order = torch.from_numpy(rng.permutation(len(x)))
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = order[i: i + batch_size]
            yield x[idx].clone(), y[idx].clone()


def at_end_of_backward(model: nn.Module, corrupt: Callable[[], None]) -> None:
    """Run ``corrupt()`` (under ``no_grad``) as the next backward through ``model`` ends, before anything reads
    the gradients: where a faulty kernel or a bad batch would strike. The monitor reads the gradients at the end
    of backward too, in a callback queued after every one queued during backward, so it sees the corruption;
    writing into ``.grad`` after ``backward()`` returns comes too late for it (and for clipping, too early).

    >>> m = nn.Linear(2, 1)
    >>> at_end_of_backward(m, lambda: m.weight.grad.fill_(7.0))
    >>> m(torch.ones(1, 2)).sum().backward()
    >>> m.weight.grad.tolist()
    [[7.0, 7.0]]
    """
    handles: list = []

    def apply() -> None:
        with torch.no_grad():
            corrupt()

    def hook(_: torch.Tensor) -> None:
        if handles:
            for h in handles:
                h.remove()
            handles.clear()
            torch.autograd.Variable._execution_engine.queue_callback(apply)

    handles.extend(p.register_post_accumulate_grad_hook(hook) for p in model.parameters() if p.requires_grad)


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    monitor=None,
    on_step: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None] | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> list[float]:
    """Train ``model`` on digits for ``steps`` steps with cross-entropy; returns the losses.

    ``on_step(step, x, y)`` runs before the forward pass of each step; it may change the optimizer (a learning
    rate jump) or return a replacement ``(x, y)`` (a poisoned batch). ``monitor.step(loss=...)`` runs after
    ``opt.step()`` and before ``zero_grad()``, as the quick start says.
    """
    loss_fn = nn.CrossEntropyLoss()
    data = batches(batch_size, seed)
    losses = []
    for step in range(steps):
        x, y = next(data)
        if on_step is not None:
            replaced = on_step(step, x, y)
            if replaced is not None:
                x, y = replaced
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(loss=loss)
        opt.zero_grad()
        losses.append(loss.item())
    return losses
