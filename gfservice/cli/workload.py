"""A real, small training workload for the demo, the tests and the benchmarks: an MLP on scikit-learn's
digits (8x8 images, shipped with the package, nothing downloaded), or on generated data when scikit-learn
is not installed, trained by a Ray Train worker with DDP or FSDP2 (gloo on CPU) and watched by a monitor.

>>> X, y = dataset()
>>> X.shape[1], int(y.max()) + 1
(64, 10)
>>> model = build_model(WorkloadConfig(depth=3, width=16))
>>> [n for n, _ in model.named_parameters()][:2]
['0.weight', '0.bias']
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field


class WorkloadConfig(BaseModel):
    """What to train and which fault to inject."""

    model_config = ConfigDict(extra="forbid")

    run: str = "demo"
    steps: int = Field(150, ge=1)
    batch_size: int = Field(64, ge=1)  # per rank
    depth: int = Field(6, ge=1)
    width: int = Field(128, ge=1)
    activation: Literal["relu", "tanh", "sigmoid"] = "relu"
    init: Literal["default", "he", "uniform"] = "he"
    lr: float = 0.05
    seed: int = 0
    #: "none", "explode@STEP" (learning rate x1000 from STEP), "nan@STEP" (NaN in rank 1's batch at STEP,
    #: rank 0 on one worker), "vanish" (a deep sigmoid network with uniform initialisation).
    fault: str = "none"
    parallel: Literal["ddp", "fsdp", "none"] = "ddp"
    every: int = 1
    deep_every: int = 25
    #: Seconds to sleep per step (to make a run last, e.g. to restart the service under it).
    step_delay_s: float = 0.0
    #: Skip the optimizer step when the gradients are not finite (what a GradScaler does): a NaN fault
    #: then stays one bad step instead of corrupting the weights for good.
    skip_nonfinite: bool = False
    #: Service handed to ``gfservice.monitor``: "auto", a name, or None for the in-process aggregator.
    service: str | None = "auto"

    def fault_kind(self) -> tuple[str, int]:
        kind, _, at = self.fault.partition("@")
        if kind not in ("none", "explode", "nan", "vanish"):
            raise ValueError(f"unknown fault {self.fault!r}: use none, explode@STEP, nan@STEP or vanish")
        if kind in ("explode", "nan") and not at.isdigit():
            raise ValueError(f"fault {self.fault!r} needs a step, e.g. {kind}@40")
        return kind, int(at) if at else -1


def dataset() -> tuple[np.ndarray, np.ndarray]:
    """Digits as float32 features scaled to [0, 1] and int64 labels."""
    try:
        from sklearn.datasets import load_digits

        d = load_digits()
        return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    except ImportError:  # generated, learnable data with the same shape
        rng = np.random.default_rng(0)
        X = rng.random((1797, 64), dtype=np.float32)
        y = (X @ rng.normal(size=(64, 10)).astype(np.float32)).argmax(1).astype(np.int64)
        return X, y


def build_model(cfg: WorkloadConfig) -> torch.nn.Sequential:
    """An MLP of ``depth`` linear layers (64 -> width ... -> 10)."""
    torch.manual_seed(cfg.seed)
    act = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}[cfg.activation]
    dims = [64] + [cfg.width] * (cfg.depth - 1) + [10]
    layers: list[torch.nn.Module] = []
    for i in range(cfg.depth):
        lin = torch.nn.Linear(dims[i], dims[i + 1])
        if cfg.init == "he":
            torch.nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            torch.nn.init.zeros_(lin.bias)
        elif cfg.init == "uniform":
            bound = 1.0 / math.sqrt(dims[i])
            torch.nn.init.uniform_(lin.weight, -bound, bound)
            torch.nn.init.uniform_(lin.bias, -bound, bound)
        layers.append(lin)
        if i < cfg.depth - 1:
            layers.append(act())
    return torch.nn.Sequential(*layers)


def vanishing_config(cfg: WorkloadConfig) -> WorkloadConfig:
    return cfg.model_copy(update={"depth": 20, "width": 32, "activation": "sigmoid", "init": "uniform"})


def batch(X: np.ndarray, y: np.ndarray, step: int, rank: int, world: int, size: int):
    """The (deterministic) batch of ``rank`` at ``step``: consecutive slices of a fixed permutation."""
    n = len(X)
    perm = np.random.default_rng(1234).permutation(n)
    start = ((step * world + rank) * size) % n
    idx = perm[np.arange(start, start + size) % n]
    return torch.from_numpy(X[idx]), torch.from_numpy(y[idx])


def train(config: dict[str, Any] | WorkloadConfig) -> dict[str, Any]:
    """The training loop (a Ray Train ``train_loop_per_worker``, or a plain function in one process)."""
    import gfservice

    cfg = WorkloadConfig.model_validate(config)
    kind, at = cfg.fault_kind()
    if kind == "vanish":
        cfg = vanishing_config(cfg)
    torch.set_num_threads(1)
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    net = build_model(cfg)
    model: torch.nn.Module = net
    if world > 1 and cfg.parallel == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(net)
    elif world > 1 and cfg.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for m in net:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m)
        fully_shard(net)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    X, y = dataset()
    monitor = gfservice.monitor(model, opt, run=cfg.run, every=cfg.every, deep_every=cfg.deep_every,
                                service=cfg.service)
    nan_rank = min(1, world - 1)
    losses = []
    for step in range(cfg.steps):
        xb, yb = batch(X, y, step, rank, world, cfg.batch_size)
        if kind == "nan" and step == at and rank == nan_rank:
            xb = xb.clone()
            xb[0, 0] = float("nan")
        if kind == "explode" and step == at:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * 1000
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        if not cfg.skip_nonfinite or torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)):
            opt.step()
        monitor.step(loss=loss)
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if monitor.should_stop:
            break
        if cfg.step_delay_s:
            time.sleep(cfg.step_delay_s)
    monitor.close()
    return {"rank": rank, "steps": len(losses), "last_loss": losses[-1] if losses else None,
            "dropped": monitor.transport.dropped, "errors": monitor.errors}


def _train_worker(config: dict[str, Any]) -> None:
    """:func:`train` as a Ray Train ``train_loop_per_worker`` (Ray ignores what the loop returns)."""
    train(config)


def fit(cfg: WorkloadConfig, workers: int, storage_path: str | os.PathLike[str]):
    """Run :func:`train` under a Ray Train ``TorchTrainer`` with ``workers`` CPU workers (gloo)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=cfg.model_dump(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=cfg.run, storage_path=str(storage_path)),
    )
    return trainer.fit()
