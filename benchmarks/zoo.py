"""The detector evaluation zoo: small training runs, healthy or with a fault injected at a known step.

Each :class:`Scenario` builds a :class:`Run` (model, optimizer, batches, loss, optional scheduler, clipping,
autocast, GradScaler and :class:`Fault`) for a seed. ``benchmarks/detection.py`` trains every scenario with
``gfservice.monitor`` attached and scores the findings against the scenario's onset, expected detector and
expected layers. This module only defines the runs; run the zoo with::

    .venv/bin/python benchmarks/detection.py            # everything, 3 seeds (about 4 minutes on 2 cores)
    .venv/bin/python benchmarks/detection.py --quick    # one seed of a handful of scenarios (under a minute)
    .venv/bin/python benchmarks/detection.py --list     # the scenarios with their onset and expected detector

Everything is CPU-sized: digits from scikit-learn (no download) or generated sequences, tiny models, a step of
a few milliseconds. Layer names are the parameter names of ``model.named_parameters()``.

TODO (multi-rank scenarios, need several processes, e.g. ``torch.multiprocessing`` with the gloo backend and
DDP, or Ray Train against a local service):

- ``rank_divergence``: one rank's local (pre-allreduce) gradient norm drifts away from the others (a rank
  reading corrupted shards, or a bad device); expected within 50 steps, naming the rank.
- ``straggler``: one rank's step time grows 3x at step k while the others wait at the allreduce; expected
  within 50 steps, naming the rank.
- ``stalled_rank``: one rank stops reporting at step k (killed worker); the others go on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

Batch = tuple[Tensor, Tensor]
LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


# ---- faults and runs ------------------------------------------------------------------------------------
@dataclass
class Fault:
    """What goes wrong, from step ``at``: once (``persistent=False``) or at every later step as well.

    ``start`` runs once before step ``at`` (change weights, learning rate, hooks). ``batch``, ``loss`` and
    ``grads`` corrupt the step's batch, its loss (before backward) and its gradients (after backward, before
    the optimizer).
    """

    at: int
    start: Callable[[Run], None] | None = None
    batch: Callable[[Tensor, Tensor], Batch] | None = None
    loss: Callable[[Tensor], Tensor] | None = None
    grads: Callable[[nn.Module], None] | None = None
    persistent: bool = False

    def active(self, step: int) -> bool:
        return step == self.at or (self.persistent and step > self.at)


@dataclass
class Run:
    """One training run: :meth:`step` runs forward, backward and the optimizer; :meth:`finish` ends a step."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[Batch]
    loss_fn: LossFn
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    clip: float | None = None
    autocast: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    fault: Fault | None = None

    def step(self, i: int) -> Tensor:
        """Train step ``i`` up to ``optimizer.step()`` (and ``scaler.update()``); returns the loss."""
        f = self.fault
        hit = f is not None and f.active(i)
        if f is not None and i == f.at and f.start is not None:
            f.start(self)
        x, y = next(self.batches)
        if hit and f.batch is not None:
            x, y = f.batch(x, y)
        ctx = torch.autocast("cpu", dtype=self.autocast) if self.autocast else contextlib.nullcontext()
        with ctx:
            loss = self.loss_fn(self.model, x, y)
        if hit and f.loss is not None:
            loss = f.loss(loss)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if hit and f.grads is not None:
            with torch.no_grad():
                f.grads(self.model)
        if self.scaler is not None:
            if self.clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            if self.clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.optimizer.step()
        return loss.detach().float()

    def finish(self) -> None:
        """After ``monitor.step``: clear the gradients and advance the schedule."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()


@dataclass(frozen=True)
class Layers:
    """The layers a finding should name: every layer of ``must``, none outside ``allowed`` (default: ``must``).

    Both are functions of the model's layer names (input to output), so they can say "the input-side half".
    """

    describe: str
    must: Callable[[Sequence[str]], set[str]]
    allowed: Callable[[Sequence[str]], set[str]] | None = None

    def check(self, named: Sequence[str], layers: Sequence[str]) -> bool:
        must = self.must(layers)
        allowed = self.allowed(layers) if self.allowed else must
        return must <= set(named) and set(named) <= allowed | must


def _prefixed(*prefixes: str) -> Callable[[Sequence[str]], set[str]]:
    return lambda layers: {n for n in layers if n.startswith(prefixes)}


def _weights(layers: Sequence[str]) -> set[str]:
    return {n for n in layers if n.endswith("weight")}


@dataclass(frozen=True)
class Scenario:
    """A registry entry: how to build the run, how long to train it and what a detector should find."""

    name: str
    kind: Literal["healthy", "pathological"]
    build: Callable[[int], Run]
    steps: int
    description: str
    onset: int | None = None
    expected: str | None = None
    layers: Layers | None = None
    #: Detectors that must not raise a warning or critical finding (e.g. nonfinite on finite gradients).
    forbid: tuple[str, ...] = ()
    #: Detector field overrides for this run; fields or detectors that are not installed are dropped.
    detectors: dict[str, dict[str, object]] = field(default_factory=dict)
    #: Part of the ``--quick`` smoke run.
    quick: bool = False


# ---- data ------------------------------------------------------------------------------------------------
@cache
def digits() -> Batch:
    """sklearn's 8x8 digits (1797 samples, shipped with scikit-learn), standardised, as float32/int64."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.data.astype(np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return torch.from_numpy(x), torch.from_numpy(d.target.astype(np.int64))


def sample(x: Tensor, y: Tensor, batch: int, seed: int) -> Iterator[Batch]:
    """Random minibatches of ``(x, y)`` forever."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(x), (batch,), generator=g)
        yield x[idx], y[idx]


def digits_batches(seed: int, batch: int = 64, image: bool = False) -> Iterator[Batch]:
    x, y = digits()
    return sample(x.view(-1, 1, 8, 8) if image else x, y, batch, seed)


def majority_batches(seed: int, batch: int = 32, length: int = 16, vocab: int = 4) -> Iterator[Batch]:
    """One-hot token sequences; the label is the most frequent token (counting over time)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        tok = torch.randint(0, vocab, (batch, length), generator=g)
        counts = F.one_hot(tok, vocab).sum(1).float() + torch.arange(vocab) * 1e-3  # ties: the higher token
        yield F.one_hot(tok, vocab).float(), counts.argmax(1)


def reverse_batches(seed: int, batch: int = 32, length: int = 10, vocab: int = 16) -> Iterator[Batch]:
    """Token sequences; the target at position i is the token at position length-1-i."""
    g = torch.Generator().manual_seed(seed)
    while True:
        tok = torch.randint(0, vocab, (batch, length), generator=g)
        yield tok, tok.flip(1)


def teacher_batches(seed: int, batch: int = 64, dim: int = 16) -> Iterator[Batch]:
    """Digits inputs, targets from a fixed random teacher network followed by LayerNorm (unit RMS)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    w1, w2 = torch.randn(64, 32, generator=g) / 8, torch.randn(32, dim, generator=g) / math.sqrt(32)
    x, _ = digits()
    y = F.layer_norm(torch.tanh(x @ w1) @ w2, (dim,))
    return sample(x, y, batch, seed)


# ---- losses and models -------------------------------------------------------------------------------------
def ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))


def naive_nll(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """-log(softmax) computed in two steps, as hand-written losses do: a probability of 0 gives inf."""
    p = torch.softmax(model(x), dim=-1)
    return -p.gather(1, y[:, None]).log().mean()


def mse(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(model(x), y)


def mlp(*sizes: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers with ``act`` between them; layer names 0.weight, 0.bias, 2.weight, ..."""
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(act())
    return nn.Sequential(*mods)


class ConvBN(nn.Module):
    """conv -> BatchNorm -> ReLU twice, average pool, linear head. The conv biases sit in front of BN."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


class Recurrent(nn.Module):
    """An LSTM or a vanilla RNN over one-hot tokens; a linear head on the last hidden state."""

    def __init__(self, cell: Literal["lstm", "rnn"], vocab: int = 4, hidden: int = 32, n_out: int = 4) -> None:
        super().__init__()
        self.rnn: nn.Module = (nn.LSTM(vocab, hidden, batch_first=True) if cell == "lstm"
                               else nn.RNN(vocab, hidden, batch_first=True, nonlinearity="relu"))
        self.head = nn.Linear(hidden, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class TinyTransformer(nn.Module):
    """Token and position embeddings, a few encoder layers (pre- or post-LN), a linear head per position."""

    def __init__(self, vocab: int = 16, length: int = 10, d: int = 32, layers: int = 2, pre_ln: bool = True):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True, norm_first=pre_ln)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d) if pre_ln else nn.Identity()
        self.head = nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.enc(self.tok(x) + self.pos)))


class ResMLP(nn.Module):
    """x + Linear(ReLU(Linear(LN(x)))) blocks between an input and an output projection."""

    def __init__(self, d: int = 64, blocks: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(64, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)) for _ in range(blocks)
        )
        self.out = nn.Linear(d, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class TwoBranch(nn.Module):
    """An MLP trunk plus an auxiliary feature branch whose output is detached by mistake: no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(64, 64)
        self.aux = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.trunk(x) + self.aux(x).detach()))


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)
