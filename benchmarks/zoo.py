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
from typing import Any, Literal

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
    corrupt the batch, the loss before backward and the gradients as backward ends (before clipping).
    """

    at: int
    start: Callable[[Run], None] | None = None
    batch: Callable[[Tensor, Tensor], Batch] | None = None
    loss: Callable[[Tensor], Tensor] | None = None
    grads: Callable[[nn.Module], None] | None = None
    persistent: bool = False
    #: With ``persistent``: hit only every ``every``-th step from ``at`` (a fault that recurs with a period).
    every: int = 1


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
    #: ``finish`` clears the gradients (a fault may turn it off: gradients accumulated without zero_grad).
    zero_grad: bool = True
    #: Called at the start of every step with the step index (gradual unfreezing and other planned changes).
    on_step: Callable[[Run, int], None] | None = None
    #: The global gradient norm ``clip_grad_norm_`` measured before clipping at the last step (clipped runs).
    preclip_norm: float | None = None

    def hit(self, i: int) -> bool:
        """Whether the fault acts at step ``i``."""
        f = self.fault
        if f is None:
            return False
        return i == f.at or (f.persistent and i > f.at and (i - f.at) % f.every == 0)

    def step(self, i: int) -> Tensor:
        """Train step ``i`` up to ``optimizer.step()`` (and ``scaler.update()``); returns the loss."""
        f = self.fault
        hit = self.hit(i)
        if self.on_step is not None:
            self.on_step(self, i)
        if f is not None and i == f.at and f.start is not None:
            f.start(self)
        x, y = next(self.batches)
        if hit and f.batch is not None:
            x, y = f.batch(x, y)
        with torch.autocast("cpu", dtype=self.autocast) if self.autocast else contextlib.nullcontext():
            loss = self.loss_fn(self.model, x, y)
        if hit and f.loss is not None:
            loss = f.loss(loss)
        undo = self._corrupt_at_end_of_backward(f.grads) if hit and f.grads is not None else None
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if undo is not None:
            undo()
        if self.clip:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            self.preclip_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), self.clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return loss.detach().float()

    def _corrupt_at_end_of_backward(self, corrupt: Callable[[nn.Module], None]) -> Callable[[], None]:
        """Corrupt the gradients as the backward ends, the way a faulty kernel or a bad batch would: queued from
        the first gradient hook, it runs before anything reads the gradients (the monitor reads them at the end
        of backward too, in a callback queued after every one queued during backward). Returns the undo of
        the hooks, for a backward that reached no parameter."""
        handles: list[Any] = []

        def remove() -> None:
            for h in handles:
                h.remove()
            handles.clear()

        def apply() -> None:
            with torch.no_grad():
                corrupt(self.model)

        def hook(_: Tensor) -> None:
            if handles:
                remove()
                torch.autograd.Variable._execution_engine.queue_callback(apply)

        handles.extend(p.register_post_accumulate_grad_hook(hook) for p in self.model.parameters() if p.requires_grad)
        return remove

    def finish(self) -> None:
        """After ``monitor.step``: clear the gradients and advance the schedule."""
        if self.zero_grad:
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
    #: The deadline rule (a key of ``detection.TARGETS``) when it is not the expected detector's own, e.g.
    #: ``"trend"``: within 30 steps of the step where the gradient norm first stands 3x above its reference.
    target: str | None = None

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

    def __init__(self, cell: Literal["lstm", "rnn", "gru", "tanh"], vocab: int = 4, hidden: int = 32,
                 n_out: int = 4) -> None:
        super().__init__()
        self.rnn: nn.Module
        if cell == "lstm":
            self.rnn = nn.LSTM(vocab, hidden, batch_first=True)
        elif cell == "gru":
            self.rnn = nn.GRU(vocab, hidden, batch_first=True)
        else:
            self.rnn = nn.RNN(vocab, hidden, batch_first=True, nonlinearity="relu" if cell == "rnn" else "tanh")
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
    m = pretrained(seed)
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


# ---- set-ups of issue 21: clipping, schedules, structure, sparse, fp16, GANs --------------------------------
def clipped(run: Run, clip: float = 1.0) -> Run:
    """The run with ``clip_grad_norm_(..., clip)`` before every optimizer step (the Transformers default)."""
    run.clip = clip
    return run


def scheduled(seed: int, kind: Literal["step", "cosine", "sgdr"], steps: int = 300) -> Run:
    """The digits MLP, SGD momentum at 0.1, under StepLR (x0.1 every 100 steps), cosine annealing, or SGDR
    (cosine with warm restarts every 60 steps: the learning rate jumps back to 0.1 at each restart)."""
    run = digits_mlp(seed, lr=0.1)
    o = run.optimizer
    run.scheduler = (torch.optim.lr_scheduler.StepLR(o, 100, 0.1) if kind == "step"
                     else torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) if kind == "cosine"
                     else torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 60))
    return run


def clipped_rnn(seed: int, cell: Literal["gru", "tanh"]) -> Run:
    """A GRU with Adam, or a tanh RNN with plain SGD at 0.1, both clipped at 1.0 (the usual RNN recipe)."""
    m = Recurrent(cell)
    batches = token_batches(seed, "majority", 16, 4)
    opt = _adam(m, 3e-3) if cell == "gru" else torch.optim.SGD(m.parameters(), lr=0.1)
    return Run(m, opt, batches, ce, clip=1.0)


def tiny_long(seed: int, steps: int = 2500) -> Run:
    """A 64-32-10 MLP, AdamW 3e-3, cosine decay over a long run."""
    m = mlp(64, 32, 10)
    o = _adam(m, 3e-3, 0.01)
    return Run(m, o, digits_batches(seed, 32), ce, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(o, steps))


def accumulating(seed: int, micro: int = 4, batch: int = 16, opt: str = "adam") -> Run:
    """Gradient accumulation done right: ``micro`` micro-batches of ``batch``, loss / micro each, one optimizer
    step."""
    run = digits_mlp(seed, opt)
    inner = digits_batches(seed, batch)

    def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        total = torch.zeros(())
        for j in range(micro):
            xb, yb = (x, y) if j == 0 else next(inner)
            part = ce(model, xb, yb) / micro
            if j < micro - 1:
                part.backward()
            total = total + part.detach() if j < micro - 1 else total + part
        return total

    run.batches, run.loss_fn = inner, loss_fn
    return run


def left_out(seed: int) -> Run:
    """The digits MLP, Adam, built over every parameter but the first layer's weight: ``optimizer.zero_grad``
    never clears that weight's ``.grad``, which sums every step's gradient (the weight itself never moves)."""
    m = mlp(64, 128, 128, 10)
    params = [p for n, p in m.named_parameters() if n != "0.weight"]
    return Run(m, torch.optim.Adam(params, lr=1e-3), digits_batches(seed), ce)


class Moe(nn.Module):
    """Top-1 mixture of experts over digits: a router picks one of ``experts`` small MLPs per sample and scales
    its output by the gate probability (Switch style). With ``detach_gate`` the gate is detached (a bug): the
    router gets no gradient."""

    def __init__(self, experts: int = 16, detach_gate: bool = False, peak: float = 8.0) -> None:
        super().__init__()
        self.router = nn.Linear(64, experts)
        with torch.no_grad():  # a peaked router: top-1 routing without a balancing loss leaves experts idle
            self.router.weight.mul_(peak)
        self.experts = nn.ModuleList(mlp(64, 32, 10) for _ in range(experts))
        self.detach_gate = detach_gate
        #: Set by a fault: the experts' outputs are .detach()ed (the whole expert layer gets no gradient).
        self.detach_experts = False

    def forward(self, x: Tensor) -> Tensor:
        probs = torch.softmax(self.router(x), -1)
        gate, idx = probs.max(-1)
        if self.detach_gate:
            gate = gate.detach()
        out = torch.zeros(len(x), 10)
        for e in idx.unique().tolist():
            sel = idx == e
            y = self.experts[e](x[sel])
            out[sel] = (y.detach() if self.detach_experts else y) * gate[sel, None]
        return out


def moe(seed: int, detach_gate: bool = False, experts: int = 16, peak: float = 8.0) -> Run:
    """8 samples a batch over 16 experts: an expert gets a token on 3-70% of the steps and may stay idle for
    100 steps or more (its ``.grad`` is None then); the first token reaches some experts only after 15 steps."""
    m = Moe(experts, detach_gate=detach_gate, peak=peak)
    return Run(m, _adam(m, 3e-3), digits_batches(seed, 8), ce)


def detach_experts(run: Run) -> None:
    """A fault: from now on the MoE's expert outputs are .detach()ed (the router still learns through the gate)."""
    run.model.detach_experts = True  # type: ignore[assignment]


class Factorisation(nn.Module):
    """Matrix factorisation: rating = <user vector, item vector> + biases; tables named for what they hold
    (``users``, ``items``), not ``*emb*``."""

    def __init__(self, users: int = 3000, items: int = 2000, d: int = 16, sparse: bool = False) -> None:
        super().__init__()
        self.users = nn.Embedding(users, d, sparse=sparse)
        self.items = nn.Embedding(items, d, sparse=sparse)
        self.user_bias = nn.Embedding(users, 1, sparse=sparse)
        for t in (self.users, self.items):
            nn.init.normal_(t.weight, 0, 0.1)
        nn.init.zeros_(self.user_bias.weight)

    def forward(self, x: Tensor) -> Tensor:
        u, i = x[:, 0], x[:, 1]
        return (self.users(u) * self.items(i)).sum(-1) + self.user_bias(u)[:, 0]


def ratings(seed: int, users: int = 3000, items: int = 2000, batch: int = 256) -> Iterator[Batch]:
    """(user, item) pairs and ratings from hidden rank-4 factors plus a little noise."""
    g = torch.Generator().manual_seed(20_000 + seed)
    fu, fi = torch.randn(users, 4, generator=g), torch.randn(items, 4, generator=g)
    while True:
        u = torch.randint(0, users, (batch,), generator=g)
        i = torch.randint(0, items, (batch,), generator=g)
        yield torch.stack([u, i], 1), (fu[u] * fi[i]).sum(-1) + 0.1 * torch.randn(batch, generator=g)


def recommender(seed: int, sparse: bool = False) -> Run:
    """Matrix factorisation, MSE; Adam on dense tables, or ``sparse=True`` tables with SparseAdam."""
    m = Factorisation(sparse=sparse)
    opt = (torch.optim.SparseAdam(list(m.parameters()), lr=1e-2) if sparse
           else torch.optim.Adam(m.parameters(), lr=1e-2))
    return Run(m, opt, ratings(seed), lambda model, x, y: F.mse_loss(model(x), y))


def pretrained(seed: int, out: int = 10) -> nn.Sequential:
    """The 64-128-128-``out`` MLP after 60 unmonitored Adam steps on digits 0-4 (then a new head)."""
    m = mlp(64, 128, 128, 5)
    x, y = digits()
    pre, opt = sample(x[y < 5], y[y < 5], 64, seed + 1), _adam(m)
    for _ in range(60):
        ce(m, *next(pre)).backward()
        opt.step()
        opt.zero_grad()
    m[-1] = nn.Linear(128, out)
    return m


def gradual_unfreeze(seed: int, every: int = 60) -> Run:
    """ULMFiT-style: only the new head trains at first; every ``every`` steps the next layer down is unfrozen
    (``requires_grad`` turned on; the optimizer holds every parameter from the start)."""
    m = pretrained(seed)
    for p in m.parameters():
        p.requires_grad_(False)
    m[-1].requires_grad_(True)
    order = [m[2], m[0]]

    def unfreeze(run: Run, i: int) -> None:
        if i and i % every == 0 and i // every <= len(order):
            order[i // every - 1].requires_grad_(True)

    return Run(m, _adam(m, 1e-3), digits_batches(seed), ce, on_step=unfreeze)


def freeze(*layers: int) -> Callable[[Run], None]:
    """A freeze done right, mid-run: ``requires_grad_(False)`` on the layers (their ``.grad`` stays None)."""

    def start(run: Run) -> None:
        for i in layers:
            run.model[i].requires_grad_(False)

    return start


class LoRA(nn.Module):
    """A frozen linear layer plus a trainable low-rank update ``B @ A`` (``B`` starts at zero, so ``A`` gets
    exactly zero gradient at the first step: by construction, not a fault)."""

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float = 8.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scale * (x @ self.lora_a.T @ self.lora_b.T)


def lora(seed: int) -> Run:
    """LoRA adapters on both hidden layers of a pre-trained MLP (frozen), a new trainable head; AdamW 1e-3."""
    m = pretrained(seed)
    m[0], m[2] = LoRA(m[0]), LoRA(m[2])
    return Run(m, _adam(m, 1e-3, 0.01), digits_batches(seed), ce)


def fp16_model(seed: int) -> Run:
    """The digits MLP held in float16 (``model.half()``), fp16 inputs, plain SGD: no autocast, no loss scaler."""
    m = mlp(64, 128, 128, 10).half()
    half = ((x.half(), y) for x, y in digits_batches(seed))
    return Run(m, torch.optim.SGD(m.parameters(), lr=0.05), half, ce)


def half_model(seed: int, dtype: torch.dtype = torch.float16) -> Run:
    """The residual MLP (LayerNorm blocks) held in ``dtype`` (``model.to(dtype)``), SGD: no autocast, no scaler."""
    m = resmlp().to(dtype)
    return Run(m, torch.optim.SGD(m.parameters(), lr=0.02), ((x.to(dtype), y) for x, y in digits_batches(seed)), ce)


class Baskets(nn.Module):
    """A user's basket of items (an ``nn.EmbeddingBag`` named ``history``, mean of 8 items) -> a rating; the
    table's rows absent from a batch get zero gradient (most of them)."""

    def __init__(self, items: int = 4000, d: int = 16) -> None:
        super().__init__()
        self.history = nn.EmbeddingBag(items, d, mode="mean")
        self.head = nn.Linear(d, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.history(x))[:, 0]


def baskets(seed: int, items: int = 4000, batch: int = 128) -> Run:
    """Baskets of 8 items; the rating is the mean of hidden item scores; Adam 1e-2."""
    g = torch.Generator().manual_seed(30_000 + seed)
    score = torch.randn(items, generator=g)

    def data() -> Iterator[Batch]:
        while True:
            x = torch.randint(0, items, (batch, 8), generator=g)
            yield x, score[x].mean(1)

    m = Baskets(items)
    return Run(m, torch.optim.Adam(m.parameters(), lr=1e-2), data(), lambda model, x, y: F.mse_loss(model(x), y))


def converging(seed: int) -> Run:
    """Linear regression onto a linear teacher with label noise 0.01, SGD momentum: the gradient norm falls
    ~300x in 200 steps to the minibatch noise floor and stays there (a run that has all but converged)."""
    g = torch.Generator().manual_seed(30_000 + seed)
    x = torch.randn(2000, 32, generator=g)
    y = x @ (torch.randn(32, 8, generator=g) / 6) + 0.01 * torch.randn(2000, 8, generator=g)
    m = nn.Linear(32, 8)
    return Run(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), sample(x, y, 64, seed),
               lambda model, x, y: F.mse_loss(model(x), y))


def converging_heavy_tail(seed: int) -> Run:
    """``converging`` with heavy-tailed label noise (Student t, 2 degrees of freedom, scale 0.01) on every target:
    once converged, the minibatch loss and gradient norm jump by large factors now and then, by nature."""
    g = torch.Generator().manual_seed(31_000 + seed)
    x = torch.randn(2000, 32, generator=g)
    t2 = torch.randn(2000, 8, generator=g) / torch.sqrt(
        (torch.randn(2000, 8, generator=g) ** 2 + torch.randn(2000, 8, generator=g) ** 2) / 2)
    y = x @ (torch.randn(32, 8, generator=g) / 6) + 0.01 * t2
    m = nn.Linear(32, 8)
    return Run(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), sample(x, y, 64, seed),
               lambda model, x, y: F.mse_loss(model(x), y))


def label_noise(scale: float) -> Callable[[Tensor, Tensor], Batch]:
    """Noise of ``scale`` on every target of one batch (a few noisy labels in a converged regression)."""
    return lambda x, y: (x, y + scale * torch.randn_like(y))


class GanRun(Run):
    """A GAN on 2-d points from a ring of 8 Gaussians: ``model`` is the generator, ``optimizer`` its Adam;
    the discriminator has its own. Each step trains D, then G (the usual two-optimizer loop). With
    ``detach`` the generator's own loss scores ``G(z).detach()`` (a bug): no gradient reaches G."""

    def __init__(self, seed: int, detach: bool = False) -> None:
        g_net = mlp(8, 64, 64, 2)
        self.d = mlp(2, 64, 64, 1)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=1e-3, betas=(0.5, 0.999))
        self.detach = detach
        gen = torch.Generator().manual_seed(40_000 + seed)

        def real() -> Iterator[Batch]:
            while True:
                k = torch.randint(0, 8, (64,), generator=gen) * (2 * math.pi / 8)
                pts = torch.stack([k.cos(), k.sin()], 1) * 2 + 0.05 * torch.randn(64, 2, generator=gen)
                yield pts, torch.randn(64, 8, generator=gen)

        super().__init__(g_net, torch.optim.Adam(g_net.parameters(), lr=1e-3, betas=(0.5, 0.999)), real(), ce)

    def step(self, i: int) -> Tensor:
        x, z = next(self.batches)
        bce = F.binary_cross_entropy_with_logits
        fake = self.model(z)
        self.opt_d.zero_grad(set_to_none=True)
        d_loss = bce(self.d(x), torch.ones(len(x), 1)) + bce(self.d(fake.detach()), torch.zeros(len(x), 1))
        d_loss.backward()
        self.opt_d.step()
        g_loss = bce(self.d(fake.detach() if self.detach else fake), torch.ones(len(x), 1))
        g_loss.backward()
        self.optimizer.step()
        return g_loss.detach()

    def finish(self) -> None:
        super().finish()
        self.opt_d.zero_grad(set_to_none=True)


def growth(rate: float, at: int) -> Fault:
    """From step ``at`` every gradient is scaled by ``rate ** (steps since at)``: a steady exponential ramp
    (5%/step: 3x in 23 steps, 100x in 95), as from a loss term whose weight grows without bound."""
    n = itertools.count()

    def grads(model: nn.Module) -> None:
        scale_grads(rate ** next(n))(model)

    return Fault(at, grads=grads, persistent=True)


def stop_zero_grad(run: Run) -> None:
    """From this step on ``optimizer.zero_grad()`` is no longer called: the gradients sum up step after step."""
    run.zero_grad = False


def set_weight_decay(wd: float) -> Callable[[Run], None]:
    def start(run: Run) -> None:
        for g in run.optimizer.param_groups:
            g["weight_decay"] = wd

    return start


def bn_weight_decay(seed: int) -> Run:
    """conv-BN with SGD 0.1 and weight decay 1e-2: the conv weights are scale-invariant (BatchNorm follows), weight
    decay shrinks them and their gradient grows as 1/|w| (Li and Arora, 2020): the gradient norm rises ~3x over
    the first 80 steps while the loss falls, then settles. Healthy."""
    m = conv_bn()
    return Run(m, _sgd(m, 0.1, weight_decay=1e-2), digits_batches(seed, image=True), ce)


def warmup_sgd(seed: int, warmup: int = 100) -> Run:
    """The digits MLP, SGD momentum; the learning rate ramps linearly from 1% to 0.1 over ``warmup`` steps."""
    run = digits_mlp(seed, lr=0.1)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda i: min(1.0, (i + 1) / warmup))
    return run


def accumulating_sgd(seed: int, micro: int = 8) -> Run:
    """Gradient accumulation done right with SGD: ``micro`` micro-batches of 8, loss / micro each, clip 1.0."""
    return clipped(accumulating(seed, micro, 8, "sgd"))


def growing_weight(at: int, doubling: int = 20) -> Fault:
    """From step ``at`` the loss is multiplied by a weight that doubles every ``doubling`` steps (a loss weight's
    schedule gone wrong): the gradient and the reported loss grow together."""
    n = itertools.count()

    def loss(value: Tensor) -> Tensor:
        return value * 2.0 ** (next(n) / doubling)

    return Fault(at, loss=loss, persistent=True)


def layer_growth(name: str, rate: float) -> Callable[[Run], None]:
    """From this step the gradient of parameter ``name`` alone is scaled by ``rate ** k`` at its k-th backward
    (a per-parameter gradient multiplier that compounds): one layer ramps while the rest stays steady."""

    def start(run: Run) -> None:
        n = itertools.count()
        param = dict(run.model.named_parameters())[name]
        param.register_hook(lambda g: g * rate ** next(n))

    return start


def left_out_head(seed: int) -> Run:
    """The digits MLP, Adam over every parameter but the output layer's weight (``4.weight``): its ``.grad`` sums
    up step after step."""
    m = mlp(64, 128, 128, 10)
    params = [p for n, p in m.named_parameters() if n != "4.weight"]
    return Run(m, torch.optim.Adam(params, lr=1e-3), digits_batches(seed), ce)


# ---- set-ups of the second wave: clipped growth, catapults, memorisation, unused parameters --------------------
def fixed_batch(batches: Iterator[Batch]) -> Iterator[Batch]:
    """The first batch of ``batches``, forever (a model asked to memorise one batch)."""
    first = next(batches)
    return itertools.repeat(first)


def memorise(seed: int) -> Run:
    """The pre-LN transformer (AdamW 3e-3, warm-up, cosine) on one fixed batch, clipped at 1.0: the loss falls to
    ~0 and the pre-clip gradient norm wanders by large factors as the model memorises (healthy)."""
    run = clipped(transformer(seed, steps=300))
    run.batches = fixed_batch(run.batches)
    return run


def catapult(seed: int, lr: float = 2.0) -> Run:
    """A 64-256-10 MLP on one-hot targets with MSE, plain SGD at an ``lr`` above the edge of stability, clipped at
    1.0: the loss first rises ~3x (the catapult phase, Lewkowycz et al., 2020), then falls to ~0.01 (healthy)."""
    m = mlp(64, 256, 10)
    return Run(m, torch.optim.SGD(m.parameters(), lr=lr), digits_batches(seed, 128),
               lambda model, x, y: F.mse_loss(model(x), F.one_hot(y, 10).float()), clip=1.0)


def clipped_rnn_sgd(seed: int, cell: Literal["lstm", "gru"], lr: float = 0.5) -> Run:
    """An LSTM or GRU with plain SGD at ``lr``, clipped at 1.0, majority token of 16 (the classic RNN recipe)."""
    m = Recurrent(cell)
    return Run(m, torch.optim.SGD(m.parameters(), lr=lr), token_batches(seed, "majority", 16, 4), ce, clip=1.0)


class WithToken(nn.Module):
    """An MLP with a learned ``mask_token`` beside its input projection that the forward pass never uses (as a
    masked-image model's mask token in classification, e.g. DINOv2): it never gets a gradient, by design."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(64, 128)
        self.mask_token = nn.Parameter(torch.zeros(1, 128))
        self.body = mlp(128, 128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(torch.relu(self.embed(x)))


def converging_classifier(seed: int) -> Run:
    """The digits MLP with Adam 3e-3 trained until the training loss is ~1e-3: a batch with one hard sample now
    and then reads tens of times the median loss (tiny all the same)."""
    m = mlp(64, 128, 128, 10)
    return Run(m, _adam(m, 3e-3), digits_batches(seed), ce)


def shuffle_labels(x: Tensor, y: Tensor) -> Batch:
    """One batch whose targets are permuted across samples (a data-loader bug): every target wrong."""
    return x, y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]


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

H = "healthy"
R = 3 * K  # onset of the faults that need a converged run
SCENARIOS += [
    # -- clipping: the monitor reads the gradients after clip_grad_norm_ (pre-clip collection comes later) --
    Scenario("transformer_clip", H, lambda s: clipped(transformer(s)), 200,
             "pre-LN transformer, AdamW, warm-up and cosine decay, clip 1.0 (the Transformers defaults)"),
    Scenario("gru_clip", H, lambda s: clipped_rnn(s, "gru"), 300, "GRU, majority token of 16, Adam, clip 1.0"),
    Scenario("rnn_tanh_clip", H, lambda s: clipped_rnn(s, "tanh"), 300,
             "tanh RNN, majority token of 16, SGD 0.1, clip 1.0"),
    Scenario("clip_lr_jump", P, lambda s: clipped(digits_mlp(s)), K + 40,
             "MLP, SGD, clip 1.0; LR x1000 at step k: the clipped norm stays at 1.0",
             fault=lambda r: Fault(K, start=scale_lr(1000.0)), onset=K, expected="exploding"),
    Scenario("clip_loss_1e6", P, lambda s: clipped(digits_mlp(s, "adam")), K + 30,
             "MLP, Adam, clip 1.0; loss x1e6 at step k (one step): clipped to norm 1.0",
             fault=lambda r: Fault(K, loss=lambda loss: loss * 1e6), onset=K, expected="exploding",
             forbid=("nonfinite",)),
    Scenario("lstm_clip_lr_jump", P, lambda s: recurrent(s, "lstm"), K + 40,
             "LSTM, Adam, clip 1.0; LR x1000 at step k", fault=lambda r: Fault(K, start=scale_lr(1000.0)),
             onset=K, expected="exploding"),
    # -- slow trends --
    Scenario("grad_accum", H, accumulating, 200, "MLP, Adam; 4 micro-batches accumulated per step, zeroed"),
    Scenario("no_zero_grad", P, lambda s: digits_mlp(s, "adam"), K + 60,
             "MLP, Adam; from step k zero_grad is never called: gradients sum up step after step",
             fault=lambda r: Fault(K, start=stop_zero_grad), onset=K, expected="exploding", target="trend",
             forbid=("nonfinite",)),
    Scenario("left_out_param", P, left_out, 80,
             "MLP, Adam over every parameter but 0.weight: its .grad is never cleared and sums up", onset=0,
             expected="exploding", target="trend", layers=Layers("0.weight", lambda ls: {"0.weight"},
                                                                 prefixed("0.weight")), forbid=("nonfinite",)),
    Scenario("steady_growth", P, lambda s: digits_mlp(s, "adam"), K + 80,
             "MLP, Adam; from step k the gradients grow 5% a step (3x after 23 steps)",
             fault=lambda r: growth(1.05, K), onset=K, expected="exploding", target="trend",
             forbid=("nonfinite",)),
    # -- optimizer --
    Scenario("lr_too_low", P, lambda s: digits_mlp(s, lr=1e-7), 60, "MLP, SGD at lr 1e-7: no weight moves",
             onset=0, expected="update_ratio"),
    Scenario("lr_too_low_adam", P, lambda s: Run(m := resmlp(), _adam(m, 1e-9), digits_batches(s), ce), 60,
             "residual MLP, AdamW at lr 1e-9: no weight moves", onset=0, expected="update_ratio"),
    Scenario("slow_sgd", H, lambda s: digits_mlp(s, lr=2e-4), 200, "MLP, SGD momentum at lr 2e-4: slow but learning"),
    Scenario("wd_collapse_sgd", P, digits_mlp, K + 40,
             "MLP, SGD momentum 0.05; weight decay 0 -> 1 at step k: the weights shrink ~5% a step",
             fault=lambda r: Fault(K, start=set_weight_decay(1.0)), onset=K, expected="update_ratio"),
    Scenario("adamw_strong_wd", H, lambda s: Run(m := mlp(64, 128, 128, 10), _adam(m, 1e-3, 1.0),
                                                  digits_batches(s), ce), 200,
             "MLP, AdamW 1e-3 with weight decay 1.0 (0.1% of the weights a step)"),
    Scenario("wd_collapse", P, lambda s: digits_mlp(s, "adamw"), K + 40,
             "MLP, AdamW; weight decay 0.01 -> 100 at step k: the weights shrink 10% a step",
             fault=lambda r: Fault(K, start=set_weight_decay(100.0)), onset=K, expected="update_ratio"),
    # -- structure --
    Scenario("moe_top1", H, moe, 300, "top-1 MoE of 8 experts, peaked router: experts idle for tens of steps"),
    Scenario("moe_sparse_32", H, lambda s: moe(s, experts=32, peak=12.0), 400,
             "top-1 MoE of 32 experts, very peaked router, 8 tokens a step: most experts get a token on a few per "
             "cent of the steps early on and on none for a hundred steps or more later (routing moved away)"),
    Scenario("moe_experts_cut", P, moe, K + 40,
             "top-1 MoE; from step k every expert's output is .detach()ed: the whole expert layer gets no gradient",
             fault=lambda r: Fault(K, start=detach_experts), onset=K, expected="no_gradient",
             layers=Layers("every experts.* layer", prefixed("experts."))),
    Scenario("moe_detached_gate", P, lambda s: moe(s, detach_gate=True), 60,
             "top-1 MoE whose gate probability is .detach()ed: the router gets no gradient", onset=0,
             expected="no_gradient", layers=Layers("router.weight, router.bias", prefixed("router."))),
    Scenario("baskets", H, baskets, 200, "nn.EmbeddingBag of 4000 items named history (mean of 8), Adam"),
    Scenario("recommender", H, recommender, 200,
             "matrix factorisation, 3000 users x 2000 items x 16 (nn.Embedding named users/items), Adam"),
    Scenario("gradual_unfreeze", H, gradual_unfreeze, 200,
             "pre-trained MLP, new head; layers unfrozen (requires_grad) one by one every 60 steps"),
    Scenario("freeze_midrun", H, lambda s: Run(m := pretrained(s), _adam(m), digits_batches(s), ce), 200,
             "pre-trained MLP; layers 0 and 2 frozen with requires_grad_(False) at step k (done right)",
             fault=lambda r: Fault(K, start=freeze(0, 2))),
    Scenario("lora", H, lora, 200, "LoRA adapters (B zero-initialised) on a frozen pre-trained MLP, AdamW"),
    Scenario("all_dead_layer", P, lambda s: digits_mlp(s, "adam"), K + 40,
             "MLP; every ReLU of the first hidden layer killed by a -100 bias at step k",
             fault=lambda r: Fault(K, start=kill_relus(0, 1.0)), onset=K, expected="dead_units",
             layers=Layers("0.weight, 0.bias (2.weight allowed)", prefixed("0."), prefixed("0.", "2.weight")),
             forbid=("no_gradient",)),
    # -- sparse gradients --
    Scenario("sparse_embedding", H, lambda s: recommender(s, sparse=True), 200,
             "matrix factorisation with nn.Embedding(sparse=True) and SparseAdam"),
    # -- precision --
    Scenario("fp16_model", H, fp16_model, 300, "MLP held in float16 (model.half()), SGD, no loss scaler"),
    Scenario("fp16_resmlp_underflow", P, half_model, K + 40,
             "residual MLP held in float16, no loss scaler; loss x1e-7 from step k: the gradients underflow",
             fault=lambda r: Fault(K, loss=lambda loss: loss * 1e-7, persistent=True), onset=K,
             expected="precision"),
    Scenario("bf16_model", H, lambda s: half_model(s, torch.bfloat16), 300,
             "residual MLP held in bfloat16 (model.to(bfloat16)), SGD, no autocast"),
    Scenario("fp16_resmlp", H, half_model, 300, "residual MLP held in float16, SGD, no loss scaler"),
    Scenario("fp16_model_underflow", P, fp16_model, K + 40,
             "MLP held in float16, no loss scaler; loss x1e-6 from step k: the gradients underflow to 0",
             fault=lambda r: Fault(K, loss=lambda loss: loss * 1e-6, persistent=True), onset=K,
             expected="precision"),
    # -- noise near convergence --
    # one batch of corrupted targets, like loss_spike_ln: the loss jumps 1e-4 -> 0.16 (1600x) and the model is
    # perturbed afterwards, a loss spike to report; its tiny gradient norm jumps ~40x, still far below the run's
    # early norms: not an explosion (class 7), so exploding must stay silent
    Scenario("converged_noise", P, converging, R + 40,
             "regression that has all but converged; one batch with noisy targets at step 3k: the loss jumps "
             "~1600x (a loss spike), its tiny gradient norm ~40x, still far below the run's early norms",
             fault=lambda r: Fault(R, batch=label_noise(0.4)), onset=R, expected="loss_spike",
             forbid=("exploding",)),
    Scenario("converged_heavy_tail", H, converging_heavy_tail, R + 40,
             "regression that has all but converged, label noise Student-t (2 dof): heavy-tailed minibatch losses "
             "and gradient norms near convergence, no fault"),
    # a real spike in a heavy-tailed run is still one: after a full window of the run's own outliers
    Scenario("heavy_tail_noise", P, converging_heavy_tail, R + 40,
             "converged_heavy_tail; one batch with noisy targets (scale 1) at step 3k: the loss jumps back above "
             "its starting level, beyond the run's own heavy-tailed outliers (at most 0.75x the starting level); "
             "that batch's gradient norm passes the run's early scale too (an exploding warning is fair)",
             fault=lambda r: Fault(R, batch=label_noise(1.0)), onset=R, expected="loss_spike"),
    Scenario("converged_lr_jump", P, converging, R + 40,
             "regression that has all but converged; LR x100 at step 3k: SGD diverges",
             fault=lambda r: Fault(R, start=scale_lr(100.0)), onset=R, expected="exploding"),
    # -- causes named right --
    Scenario("nan_every_k", P, digits_mlp, K + 100, "MLP; one NaN input value every 25 steps from step k",
             fault=lambda r: Fault(K, batch=nan_input, persistent=True, every=25), onset=K,
             expected="nonfinite"),
    Scenario("gan", H, GanRun, 300, "GAN on a ring of Gaussians, two Adam optimizers; monitor on the generator"),
    Scenario("gan_detached_generator", P, lambda s: GanRun(s, detach=True), 60,
             "GAN whose generator loss scores G(z).detach(): no gradient reaches the generator", onset=0,
             expected="no_gradient"),
    # -- schedules and long runs --
    Scenario("step_lr", H, lambda s: scheduled(s, "step"), 300, "MLP, SGD 0.1, StepLR x0.1 every 100 steps"),
    Scenario("cosine", H, lambda s: scheduled(s, "cosine"), 300, "MLP, SGD 0.1, cosine annealing to 0"),
    Scenario("sgdr", H, lambda s: scheduled(s, "sgdr"), 300,
             "MLP, SGD 0.1, cosine with warm restarts every 60 steps (the LR jumps back at each restart)"),
    Scenario("long_run", H, tiny_long, 2500, "64-32-10 MLP, AdamW, cosine decay, 2,500 steps"),
    # -- slow trends, healthy and pathological (growth that is training, growth that is a fault) --
    Scenario("bn_weight_decay", H, bn_weight_decay, 300,
             "conv-BN, SGD 0.1, weight decay 1e-2: the gradient norm rises ~3x in 80 steps as the loss falls"),
    Scenario("warmup_sgd", H, warmup_sgd, 300, "MLP, SGD, learning rate warmed up linearly over 100 steps"),
    Scenario("grad_accum_sgd", H, accumulating_sgd, 200, "MLP, SGD; 8 micro-batches accumulated per step, clip 1.0"),
    Scenario("growing_weight", P, lambda s: digits_mlp(s, "adam"), K + 100,
             "MLP, Adam; from step k the loss is weighted by a factor that doubles every 20 steps",
             fault=lambda r: growing_weight(K), onset=K, expected="exploding", target="trend", forbid=("nonfinite",)),
    Scenario("layer_ramp", P, lambda s: digits_mlp(s, "adam"), K + 80,
             "MLP, Adam; from step k the gradient of 2.weight alone grows 5% a step (the rest stays steady)",
             fault=lambda r: Fault(K, start=layer_growth("2.weight", 1.05)), onset=K, expected="exploding",
             target="trend", layers=Layers("2.weight", lambda ls: {"2.weight"}, prefixed("2.weight")),
             forbid=("nonfinite",)),
    Scenario("left_out_head", P, left_out_head, 80,
             "MLP, Adam over every parameter but the output weight 4.weight: its .grad is never cleared", onset=0,
             expected="exploding", target="trend",
             layers=Layers("4.weight", lambda ls: {"4.weight"}, prefixed("4.weight")), forbid=("nonfinite",)),
]

SCENARIOS += [
    # -- class 1/2 under clipping: healthy growth of the pre-clip norm, and growth that is a fault --
    Scenario("transformer_memorise", H, memorise, 300,
             "pre-LN transformer, AdamW, warm-up and cosine, clip 1.0, one fixed batch: memorised, loss ~0"),
    # relabelled pathological (not dropped): above the edge of stability SGD rewrites several per cent of the
    # weights per step from step 0, and update_ratio's warning at step 0 says so rightly; the run recovers
    # (the catapult), but a learning rate that only works by catapulting is worth a warning, and the scenario
    # keeps covering update_ratio on a clipped SGD run
    Scenario("catapult", P, catapult, 300,
             "64-256-10 MLP, MSE, SGD lr 2.0 (above the edge of stability), clip 1.0: loss up ~3x, then down; "
             "several % of the weights rewritten per step", onset=0, expected="update_ratio"),
    Scenario("lstm_sgd_clip", H, lambda s: clipped_rnn_sgd(s, "lstm"), 300, "LSTM, SGD 0.5, clip 1.0"),
    Scenario("gru_sgd_clip", H, lambda s: clipped_rnn_sgd(s, "gru"), 300, "GRU, SGD 0.5, clip 1.0"),
    Scenario("clip_steady_growth", P, lambda s: clipped(digits_mlp(s, "adam")), K + 80,
             "MLP, Adam, clip 1.0; from step k the gradients grow 5% a step before clipping (the update does not)",
             fault=lambda r: growth(1.05, K), onset=K, expected="exploding", target="trend", forbid=("nonfinite",)),
    Scenario("rnn_tanh_clip_growth", P, lambda s: clipped_rnn(s, "tanh"), 3 * K,
             "tanh RNN, SGD 0.1, clip 1.0; from step 2k the gradients grow 5% a step before clipping",
             fault=lambda r: growth(1.05, 2 * K), onset=2 * K, expected="exploding", target="trend",
             forbid=("nonfinite",)),
    Scenario("clip_slow_growth_transformer", P, lambda s: clipped(transformer(s)), K + 120,
             "pre-LN transformer, AdamW, warm-up and cosine decay, clip 1.0; from step k every gradient grows 3% a "
             "step before clipping (a loss weight that keeps growing, under the Transformers defaults)",
             fault=lambda r: growth(1.03, K), onset=K, expected="exploding", target="trend", forbid=("nonfinite",)),
    Scenario("slow_growth", P, lambda s: digits_mlp(s, "adam"), K + 120,
             "MLP, Adam; from step k the gradients grow 3% a step (3x after 37 steps)",
             fault=lambda r: growth(1.03, K), onset=K, expected="exploding", target="trend", forbid=("nonfinite",)),
    Scenario("cosine_growth", P, lambda s: scheduled(s, "cosine"), 2 * K,
             "MLP, SGD 0.1, cosine annealing; from step k the gradients grow 5% a step",
             fault=lambda r: growth(1.05, K), onset=K, expected="exploding", target="trend", forbid=("nonfinite",)),
    # -- class 7: a converged run's own scale --
    Scenario("converged_classifier", H, converging_classifier, 400,
             "digits MLP, Adam 3e-3, trained to a loss of ~1e-3: hard samples make the tiny loss jump tens of times"),
    Scenario("converged_label_shuffle", P, converging, R + 20,
             "regression that has all but converged; one batch with its targets shuffled at step 3k: the loss "
             "jumps back above the run's starting level", fault=lambda r: Fault(R, batch=shuffle_labels), onset=R,
             expected="loss_spike"),
    # -- class 4: a lone parameter that is never used is not a detached branch --
    Scenario("unused_token", H, lambda s: Run(m := WithToken(), _adam(m), digits_batches(s), ce), 200,
             "MLP with a learned mask_token beside its input projection that the forward never uses (DINOv2-like)"),
]

BY_NAME: dict[str, Scenario] = {s.name: s for s in SCENARIOS}
