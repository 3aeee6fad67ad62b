"""The detector evaluation zoo: small training runs, healthy or with a fault injected at a known step.

Each :class:`Scenario` builds a :class:`Run` (model, optimizer, batches, loss; optionally a scheduler, clipping,
autocast, a GradScaler and a :class:`Fault` with a known onset) for a seed: digits from scikit-learn (no
download) or generated sequences, tiny models, a step of a few milliseconds on a CPU. ``detection.py`` trains
them with ``gfservice.monitor`` attached and scores the findings. Run the zoo with
``.venv/bin/python benchmarks/detection.py [--quick] [--only NAME,...] [--seeds N] [--list]``.

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
import itertools
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
    """What goes wrong at step ``at`` (and every later step if ``persistent``).

    ``start`` runs once before step ``at`` (weights, learning rate, hooks); ``batch``, ``loss`` and ``grads``
    corrupt the batch, the loss before backward and the gradients before the optimizer step.
    """

    at: int
    start: Callable[[Run], None] | None = None
    batch: Callable[[Tensor, Tensor], Batch] | None = None
    loss: Callable[[Tensor], Tensor] | None = None
    grads: Callable[[nn.Module], None] | None = None
    persistent: bool = False


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
        hit = f is not None and (i == f.at or (f.persistent and i > f.at))
        if f is not None and i == f.at and f.start is not None:
            f.start(self)
        x, y = next(self.batches)
        if hit and f.batch is not None:
            x, y = f.batch(x, y)
        with torch.autocast("cpu", dtype=self.autocast) if self.autocast else contextlib.nullcontext():
            loss = self.loss_fn(self.model, x, y)
        if hit and f.loss is not None:
            loss = f.loss(loss)
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if hit and f.grads is not None:
            with torch.no_grad():
                f.grads(self.model)
        if self.clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
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


def prefixed(*prefixes: str) -> Callable[[Sequence[str]], set[str]]:
    return lambda layers: {n for n in layers if n.startswith(prefixes)}


@dataclass(frozen=True)
class Scenario:
    """A registry entry: how to build the run, how long to train it and what a detector should find."""

    name: str
    kind: Literal["healthy", "pathological"]
    build: Callable[[int], Run]
    steps: int
    description: str
    #: The fault injected into the run (built once the run exists, so it can name its layers).
    fault: Callable[[Run], Fault] | None = None
    onset: int | None = None
    expected: str | None = None
    layers: Layers | None = None
    #: Detectors that must not raise a warning or critical finding (e.g. nonfinite on finite gradients).
    forbid: tuple[str, ...] = ()
    #: Detector field overrides for this run; fields or detectors that are not installed are dropped.
    detectors: dict[str, dict[str, object]] = field(default_factory=dict)
    #: Part of the ``--quick`` smoke run.
    quick: bool = False

    def make(self, seed: int) -> Run:
        """Seed torch, build the run and arm its fault."""
        torch.manual_seed(seed)
        run = self.build(seed)
        run.fault = self.fault(run) if self.fault else None
        return run


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


def token_batches(seed: int, task: Literal["majority", "reverse"], length: int, vocab: int) -> Iterator[Batch]:
    """Random tokens, 32 sequences a batch. ``majority``: one-hot inputs, the label is the most frequent token
    (counting over time). ``reverse``: token ids, the target at position i is the token at length-1-i."""
    g = torch.Generator().manual_seed(seed)
    while True:
        tok = torch.randint(0, vocab, (32, length), generator=g)
        if task == "reverse":
            yield tok, tok.flip(1)
        else:  # ties go to the higher token
            yield F.one_hot(tok, vocab).float(), (F.one_hot(tok, vocab).sum(1) + torch.arange(vocab) / 8).argmax(1)


# ---- losses and models -------------------------------------------------------------------------------------
def ce(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x).float()
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def naive_nll(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """-log(softmax) computed in two steps, as hand-written losses do: a probability of 0 gives inf."""
    p = torch.softmax(model(x), dim=-1)
    return -p.gather(1, y[:, None]).log().mean()


def mlp(*sizes: int, act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers with ``act`` between them; layer names 0.weight, 0.bias, 2.weight, ..."""
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        mods.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(act())
    return nn.Sequential(*mods)


def conv_bn() -> nn.Sequential:
    """conv -> BatchNorm -> ReLU twice, average pool, linear head. The conv biases (0.bias, 3.bias) sit in
    front of BatchNorm, which removes whatever they add: their gradient is ~0 by design."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


class Add(nn.Module):
    """``main(x) + side(x)``; with ``detach_side`` the side branch's output is detached (by mistake)."""

    def __init__(self, main: nn.Module, side: nn.Module, detach_side: bool = False) -> None:
        super().__init__()
        self.main, self.side, self.detach_side = main, side, detach_side

    def forward(self, x: Tensor) -> Tensor:
        side = self.side(x)
        return self.main(x) + (side.detach() if self.detach_side else side)


def resmlp(d: int = 64, blocks: int = 6) -> nn.Sequential:
    """x + Linear(ReLU(Linear(LayerNorm(x)))) blocks between an input and an output projection."""
    block = [Add(nn.Identity(), nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)))
             for _ in range(blocks)]
    return nn.Sequential(nn.Linear(64, d), *block, nn.Linear(d, 10))


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
        self.pos = nn.Parameter(torch.randn(length, d))
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True, norm_first=pre_ln)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d) if pre_ln else nn.Identity()
        self.head = nn.Linear(d, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.enc(self.tok(x) + self.pos)))


def warmup_cosine(opt: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def f(step: int) -> float:
        t = min(1.0, max(0, step - warmup) / max(1, total - warmup))
        return (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, f)


# ---- builders ------------------------------------------------------------------------------------------------
def _sgd(model: nn.Module, lr: float = 0.05, **kw: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, **kw)


def _adam(model: nn.Module, lr: float = 1e-3, wd: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)


def digits_mlp(seed: int, opt: str = "sgd", lr: float | None = None, loss: LossFn = ce,
               autocast: torch.dtype | None = None, scaler: bool = False) -> Run:
    """The workhorse: a 64-128-128-10 ReLU MLP on digits; SGD with momentum, Adam or AdamW."""
    m = mlp(64, 128, 128, 10)
    o = _sgd(m, lr or 0.05) if opt == "sgd" else _adam(m, lr or 1e-3, 0.01 if opt == "adamw" else 0.0)
    return Run(m, o, digits_batches(seed), loss, autocast=autocast,
               scaler=torch.amp.GradScaler("cpu") if scaler else None)


def cnn_bn(seed: int) -> Run:
    m = conv_bn()
    return Run(m, _sgd(m, 0.05, weight_decay=5e-4), digits_batches(seed, image=True), ce)


def recurrent(seed: int, cell: Literal["lstm", "rnn"]) -> Run:
    """LSTM, Adam, clipping at 1.0; or a ReLU RNN whose recurrent matrix is 3x orthogonal (gradient ~1e5x)."""
    m = Recurrent(cell)
    batches = token_batches(seed, "majority", 16, 4)
    if cell == "lstm":
        return Run(m, _adam(m, 3e-3), batches, ce, clip=1.0)
    nn.init.orthogonal_(m.rnn.weight_hh_l0, gain=3.0)
    return Run(m, torch.optim.SGD(m.parameters(), lr=0.01), batches, ce)


def transformer(seed: int, pre_ln: bool = True, steps: int = 200) -> Run:
    """Pre-LN: AdamW 3e-3, 30-step linear warm-up, cosine decay. Post-LN: AdamW 5e-2 without warm-up, which
    never learns (pre-LN with warm-up learns at that peak LR)."""
    m = TinyTransformer(pre_ln=pre_ln)
    opt = _adam(m, 3e-3 if pre_ln else 5e-2, 0.01)
    sched = warmup_cosine(opt, 30, steps) if pre_ln else None
    return Run(m, opt, token_batches(seed, "reverse", 10, 16), ce, scheduler=sched)


def finetune(seed: int, steps: int = 300) -> Run:
    """Pre-train (unmonitored) on digits 0-4, new head, fine-tune on all ten; the LR drops 10x mid-run."""
    m = mlp(64, 128, 128, 5)
    x, y = digits()
    pre, opt = sample(x[y < 5], y[y < 5], 64, seed + 1), _adam(m)
    for _ in range(60):
        ce(m, *next(pre)).backward()
        opt.step()
        opt.zero_grad()
    m[-1] = nn.Linear(128, 10)
    o = _sgd(m, 0.02)
    sched = torch.optim.lr_scheduler.MultiStepLR(o, milestones=[steps // 2], gamma=0.1)
    return Run(m, o, digits_batches(seed), ce, scheduler=sched)


def sigmoid20(seed: int) -> Run:
    """20 sigmoid layers, Glorot-uniform init (Glorot & Bengio's setting): each layer shrinks the gradient ~4x."""
    m = mlp(64, *[32] * 19, 10, act=nn.Sigmoid)
    for mod in m:
        if isinstance(mod, nn.Linear):
            nn.init.xavier_uniform_(mod.weight)
            nn.init.zeros_(mod.bias)
    return Run(m, torch.optim.SGD(m.parameters(), lr=0.1), digits_batches(seed), ce)


def two_branch() -> nn.Sequential:
    """Two linear branches summed, the side one detached by mistake: 0.side.weight and 0.side.bias get no .grad."""
    return nn.Sequential(Add(nn.Linear(64, 64), nn.Linear(64, 64), detach_side=True), nn.ReLU(), nn.Linear(64, 10))


def ln_regression(seed: int) -> Run:
    """Regression through an output LayerNorm (no affine) onto a fixed random teacher's LayerNorm'ed outputs."""
    g = torch.Generator().manual_seed(10_000 + seed)
    x, _ = digits()
    y = F.layer_norm(torch.tanh(x @ torch.randn(64, 32, generator=g) / 8) @ torch.randn(32, 16, generator=g), (16,))
    m = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16), nn.LayerNorm(16, elementwise_affine=False))
    return Run(m, _adam(m, 3e-3), sample(x, y, 64, seed), lambda model, x, y: F.mse_loss(model(x), y))


# ---- faults --------------------------------------------------------------------------------------------------
def scale_lr(factor: float) -> Callable[[Run], None]:
    def start(run: Run) -> None:
        for g in run.optimizer.param_groups:
            g["lr"] *= factor

    return start


def nan_input(x: Tensor, y: Tensor) -> Batch:
    x = x.clone()
    x[3, 5] = float("nan")
    return x, y


def saturate(x: Tensor, y: Tensor) -> Batch:
    """Four inputs x1e4 with wrong labels: softmax is exactly 0 at the label, and log(0) = -inf."""
    x, y = x.clone(), y.clone()
    x[:4] *= 1e4
    y[:4] = (y[:4] + torch.arange(1, 5)) % 10
    return x, y


def inf_grad(model: nn.Module) -> None:
    """One inf gradient value, as from an op whose fp16 backward overflows at any loss scale."""
    next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")  # type: ignore


def scale_grads(factor: float) -> Callable[[nn.Module], None]:
    def scale(model: nn.Module) -> None:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(factor)

    return scale


def zero_grad_hooks(*names: str) -> Callable[[Run], None]:
    """A freeze done wrong: hooks zero the layers' gradients (weight decay and momentum still move them)."""

    def start(run: Run) -> None:
        for n, p in run.model.named_parameters():
            if n in names:
                p.register_hook(torch.zeros_like)

    return start


def kill_relus(layer: int, fraction: float) -> Callable[[Run], None]:
    """A -100 bias on ``fraction`` of a hidden layer's units: their ReLUs never fire again."""

    def start(run: Run) -> None:
        with torch.no_grad():
            run.model[layer].bias[: int(fraction * run.model[layer].out_features)] = -100.0

    return start


K = 100  # onset of the mid-run faults
P = "pathological"

SCENARIOS: list[Scenario] = [
    Scenario("mlp", "healthy", digits_mlp, 300, "ReLU MLP on digits, SGD momentum", quick=True),
    Scenario("cnn_bn", "healthy", cnn_bn, 300, "conv->BN->ReLU x2 on 8x8 digits; conv biases get ~0 gradient",
             quick=True),
    Scenario("lstm_clip", "healthy", lambda s: recurrent(s, "lstm"), 300, "LSTM, majority token of 16, Adam, "
             "clip 1.0"),
    Scenario("transformer", "healthy", transformer, 200, "pre-LN transformer, reverse 10 tokens, AdamW, "
             "30-step warm-up, cosine decay"),
    Scenario("resmlp", "healthy", lambda s: Run(m := resmlp(), _adam(m), digits_batches(s), ce), 300,
             "residual MLP with LayerNorm, 6 blocks, Adam"),
    Scenario("finetune", "healthy", finetune, 300, "pre-trained MLP, new head, SGD; LR drops 10x at step 150"),
    Scenario("bf16", "healthy", lambda s: digits_mlp(s, "adam", autocast=torch.bfloat16), 300,
             "MLP under bf16 autocast, Adam"),
    Scenario("amp_fp16", "healthy", lambda s: digits_mlp(s, autocast=torch.float16, scaler=True), 300,
             "MLP under fp16 autocast with a GradScaler, SGD"),
    Scenario("vanishing_sigmoid", P, sigmoid20, 120, "20 sigmoid layers, Glorot-uniform init, SGD",
             onset=0, expected="vanishing", quick=True,
             layers=Layers("input-side 2/3, from the first layer", lambda ls: {ls[0], ls[1]},
                           lambda ls: set(ls[: 2 * len(ls) // 3]))),
    Scenario("rnn_exploding", P, lambda s: recurrent(s, "rnn"), 30,
             "ReLU RNN, recurrent weight 3x orthogonal: gradient ~1e5x, NaN by step 3; no clipping",
             onset=0, expected="exploding"),
    Scenario("lr_jump", P, digits_mlp, K + 40, "MLP, SGD; LR x300 at step k",
             fault=lambda r: Fault(K, start=scale_lr(300.0)), onset=K, expected="exploding", quick=True),
    Scenario("postln_no_warmup", P, lambda s: transformer(s, pre_ln=False), 200,
             "post-LN transformer, AdamW 5e-2, no warm-up: never learns", onset=0, expected="update_ratio"),
    Scenario("nan_batch", P, digits_mlp, K + 20, "MLP; one NaN input value at step k",
             fault=lambda r: Fault(K, batch=nan_input), onset=K, expected="nonfinite", quick=True),
    Scenario("inf_loss", P, lambda s: digits_mlp(s, loss=naive_nll), K + 20,
             "MLP, log(softmax) in two steps; saturated samples at step k give an infinite loss",
             fault=lambda r: Fault(K, batch=saturate), onset=K, expected="nonfinite"),
    Scenario("grad_1e20", P, lambda s: digits_mlp(s, "adam"), K + 30,
             "MLP, Adam; loss x1e20 at step k: gradient norm ~1e20, still finite",
             fault=lambda r: Fault(K, loss=lambda loss: loss * 1e20), onset=K, expected="exploding",
             forbid=("nonfinite",), quick=True),
    Scenario("scaler_collapse", P, lambda s: digits_mlp(s, autocast=torch.float16, scaler=True), K + 40,
             "fp16 autocast + GradScaler; an inf gradient every step from k: the scale halves each step",
             fault=lambda r: Fault(K, grads=inf_grad, persistent=True), onset=K, expected="loss_scale"),
    Scenario("detached_branch", P, lambda s: Run(m := two_branch(), _adam(m), digits_batches(s), ce), 60,
             "a side branch whose output is .detach()ed: its .grad stays None", onset=0,
             expected="no_gradient", layers=Layers("0.side.weight, 0.side.bias", prefixed("0.side."))),
    Scenario("frozen_layer", P, lambda s: digits_mlp(s, "adam"), K + 40,
             "MLP; from step k a hook zeroes layer 2's gradients (a freeze done wrong)",
             fault=lambda r: Fault(K, start=zero_grad_hooks("2.weight", "2.bias")), onset=K,
             expected="no_gradient", layers=Layers("2.weight, 2.bias", prefixed("2."))),
    Scenario("loss_spike_ln", P, ln_regression, 170,
             "regression through an output LayerNorm; targets x1.3 in one batch: loss x3, gradient norm not up",
             fault=lambda r: Fault(150, batch=lambda x, y: (x, y * 1.3)), onset=150, expected="loss_spike"),
    Scenario("dead_relu", P, lambda s: digits_mlp(s, "adam"), K + 40,
             "MLP; 95% of the first hidden layer's ReLUs killed by a -100 bias at step k",
             fault=lambda r: Fault(K, start=kill_relus(0, 0.95)), onset=K, expected="dead_units",
             layers=Layers("0.weight, 0.bias (2.weight allowed)", prefixed("0."), prefixed("0.", "2.weight"))),
    Scenario("fp16_underflow", P, lambda s: digits_mlp(s, "adam"), K + 40,
             "MLP, Adam; gradients x1e-6 from step k: below fp16's smallest subnormal",
             fault=lambda r: Fault(K, grads=scale_grads(1e-6), persistent=True), onset=K, expected="precision",
             detectors={"precision": {"enabled": True, "format": "fp16"}},
             layers=Layers("every weight", lambda ls: {n for n in ls if n.endswith("weight")}, set)),
    Scenario("update_ratio", P, lambda s: digits_mlp(s, "adamw", 0.08), 60,
             "MLP, AdamW lr 0.08: updates rewrite several per cent of the weights every step", onset=0,
             expected="update_ratio"),
]

BY_NAME: dict[str, Scenario] = {s.name: s for s in SCENARIOS}
