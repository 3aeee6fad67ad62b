"""Guard mode on the evaluation zoo: poisoned runs trained clean, poisoned unguarded, poisoned guarded and clean
without the guarded run's skipped batches, judged on held-out data against the clean run's noise band; and
every healthy run guarded (false skips, and how far its steps stayed from the guard's limit).

```bash
.venv/bin/python benchmarks/guard.py                  # default: about 5 minutes on 2 cores
.venv/bin/python benchmarks/guard.py --seeds 3        # more seeds
.venv/bin/python benchmarks/guard.py --poisoned-only --steps 900   # the poisoned runs 3x longer
.venv/bin/python benchmarks/guard.py --healthy-only --seeds 3 --json out.json
.venv/bin/python benchmarks/guard.py --collective     # the sharded guard's all-reduce, 2 gloo ranks on CPU
.venv/bin/python benchmarks/guard.py --update-norms   # do Adam update norms warn before gradient norms?
.venv/bin/python benchmarks/guard.py --step-time --fused   # fused AdamW: the host verdict against the device one
```

Poisons (``POISONS``), injected into zoo runs at steps drawn from the seed (after the guard's warm-up):

- ``corrupt_x1000``: three batches whose loss (and so gradient) is 1000x (a corrupted batch; token models cannot
  take scaled inputs, so the loss carries the corruption);
- ``nan_batch``: two batches whose loss is NaN (a NaN input value, a log of 0);
- ``lr_spike``: the learning rate x100 for one step (a scheduler bug). Its damage is done by that step's
  normal-looking gradient; the guard sees only the explosion of the steps after it.

Per poisoned run: the final loss, the loss on a fixed held-out evaluation set at the end (``DATA``: 360 digits no
run trains on; 1,024 token sequences from a seed no run trains on), of four trainings of the same model, seed and
data order: clean, poisoned unguarded, poisoned guarded, and clean *without the guarded run's skipped batches*
(their optimizer steps left out by hand, the scheduler stepping on: what a skip does). The guard works where the
guarded run equals that fourth one; the distance between the fourth one and the clean run is what leaving those
batches out costs by itself. Against it, the run-to-run noise band of the clean run: its final loss over
``RESEEDS`` other data orders, and over ``LEAVE_OUTS`` runs with two random batches left out. Then the steps
skipped, poisoned steps skipped and other skips. Per healthy run: skips
(false skips), the smallest headroom (the guard's limit over the step's norm: below 1 a step is skipped) and the
largest jump over the history's median. The step-time ratio guard-on / guard-off (the same monitor otherwise)
is measured on the healthy runs, run in alternation in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import torch

import gfservice
from gfservice.training.guard import GuardConfig

if __package__:  # imported as benchmarks.guard
    from . import zoo
else:  # run as a script: benchmarks/ is on sys.path
    import zoo  # type: ignore[no-redef]

#: The poisoned runs: zoo scenarios (healthy ones, so that the poison is the only fault).
POISONED_MODELS = ("mlp", "resmlp", "transformer", "lstm_clip", "cnn_bn")
LAST = 20  # poisons hit no step among the last LAST + 5
#: Healthy runs timed guard-on against guard-off (each trained twice more each way, alternating).
TIMED = ("mlp", "cnn_bn", "resmlp", "transformer", "lstm_clip", "grad_accum")


@dataclass
class Poison:
    name: str
    #: Steps hit, from the seed and the run's length.
    steps: Callable[[random.Random, int], list[int]]
    loss: Callable[[torch.Tensor], torch.Tensor] | None = None
    lr_factor: float | None = None


def _spread(k: int) -> Callable[[random.Random, int], list[int]]:
    def pick(rng: random.Random, steps: int) -> list[int]:
        return sorted(rng.sample(range(40, steps - LAST - 5), k))
    return pick


POISONS = [
    Poison("corrupt_x1000", _spread(3), loss=lambda loss: loss * 1000.0),
    Poison("nan_batch", _spread(2), loss=lambda loss: loss * float("nan")),
    Poison("lr_spike", _spread(1), lr_factor=100.0),
]


# ---- the poisoned runs' data: a training stream and a fixed held-out evaluation set ---------------------------
Batch = tuple[torch.Tensor, torch.Tensor]
HELD_OUT = 360  # digits samples (of 1,797) no run trains on
EVAL_SEED = 10**6  # the token tasks' held-out sequences come from a seed no run trains on
EVAL_BATCHES = 32  # of 32 sequences: 1,024


@dataclass(frozen=True)
class Data:
    """A poisoned run's training batches (from a data-order seed) and its held-out evaluation set, the zoo
    builder's own batches (size, shape, task) but for the held-out samples."""

    train: Callable[[int], Iterator[Batch]]
    held_out: Callable[[], Batch]


@cache
def _digits_split() -> tuple[Batch, Batch]:
    """(train, held out): a fixed split of the digits."""
    x, y = zoo.digits()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return (x[perm[HELD_OUT:]], y[perm[HELD_OUT:]]), (x[perm[:HELD_OUT]], y[perm[:HELD_OUT]])


def _digits(image: bool = False) -> Data:
    """``zoo.digits_batches`` (64 a batch) on the training split."""
    def shaped(b: Batch) -> Batch:
        return (b[0].view(-1, 1, 8, 8) if image else b[0]), b[1]

    return Data(lambda seed: zoo.sample(*shaped(_digits_split()[0]), 64, seed), lambda: shaped(_digits_split()[1]))


def _tokens(task: Any, length: int, vocab: int) -> Data:
    """``zoo.token_batches``; held out: ``EVAL_BATCHES`` batches drawn from ``EVAL_SEED``."""
    @cache
    def held_out() -> Batch:
        it = zoo.token_batches(EVAL_SEED, task, length, vocab)
        xs, ys = zip(*(next(it) for _ in range(EVAL_BATCHES)), strict=True)
        return torch.cat(xs), torch.cat(ys)

    return Data(lambda seed: zoo.token_batches(seed, task, length, vocab), held_out)


DATA = {"mlp": _digits(), "resmlp": _digits(), "cnn_bn": _digits(image=True),
        "lstm_clip": _tokens("majority", 16, 4), "transformer": _tokens("reverse", 10, 16)}


def evaluate(run: zoo.Run, held_out: Batch) -> float:
    """The run's loss on ``held_out`` (eval mode: BatchNorm's running statistics), NaN where not finite."""
    was = run.model.training
    run.model.eval()
    with torch.no_grad():
        loss = float(run.loss_fn(run.model, *held_out))
    run.model.train(was)
    return loss if math.isfinite(loss) else float("nan")


@dataclass
class Trained:
    losses: list[float]
    skipped: list[tuple[int, str]]
    seconds: float
    #: (norm, limit) of every judged step (guarded runs).
    judged: list[tuple[float, float | None, float | None]] = field(default_factory=list)
    errors: int = 0
    #: The monitor's merged steps (``keep_steps``).
    stats: list[Any] = field(default_factory=list)
    #: The loss on the held-out set at the end (runs given ``data``).
    held_out: float = float("nan")
    #: The model's final parameters and buffers (runs given ``data``).
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def final(self) -> float:
        """The final loss: on the held-out set at the end."""
        return self.held_out

    def same_weights(self, other: Trained) -> bool:
        """Whether the two runs ended with bitwise-equal parameters and buffers."""
        return self.state.keys() == other.state.keys() and all(
            torch.equal(v, other.state[k]) for k, v in self.state.items())


def _step_left_out(run: zoo.Run, i: int) -> torch.Tensor:
    """Step ``i`` with its optimizer step left out by hand (the forward, backward and scheduler run on), as a
    guard's skip leaves it out."""
    opt = run.optimizer
    own = opt.__dict__.get("step")
    opt.step = lambda *a, **k: None  # type: ignore[method-assign, assignment]
    try:
        return run.step(i)
    finally:
        if own is None:
            del opt.step
        else:
            opt.step = own  # type: ignore[method-assign]


def train(sc: zoo.Scenario, seed: int, guard: GuardConfig | None, poison: Poison | None = None,
          hit: list[int] | None = None, monitor: bool = True, deep_every: int = 50,
          keep_steps: bool = False, data: Data | None = None, data_seed: int | None = None,
          leave_out: Collection[int] = ()) -> Trained:
    """Train ``sc`` with ``seed`` under a monitor (guard on or off), with ``poison`` at the steps ``hit``
    (``keep_steps``: keep the monitor's merged steps). With ``data``: train on its batches (data order
    ``data_seed``, default ``seed``) and end with the held-out loss; the optimizer steps of ``leave_out`` are
    left out by hand."""
    run = sc.make(seed)
    if data is not None:
        run.batches = data.train(seed if data_seed is None else data_seed)
    hit_set = set(hit or [])
    if poison is not None and poison.loss is not None:
        run.fault = zoo.Fault(-1, loss=poison.loss)  # armed by hand below
    mon = gfservice.monitor(run.model, run.optimizer, run=f"guard-{sc.name}-{seed}", service=None,
                            scaler=run.scaler, guard=guard, sinks=[], deep_every=deep_every) if monitor else None
    judged: list[tuple[float, float | None, float | None]] = []
    if mon is not None and mon.guard is not None:
        _record(mon.guard, judged)
    losses: list[float] = []
    t0 = time.perf_counter()
    for i in range(sc.steps):
        if poison is not None and run.fault is not None:
            run.fault.at = i if i in hit_set else -1
        spike = poison is not None and poison.lr_factor is not None and i in hit_set
        lrs = [g["lr"] for g in run.optimizer.param_groups]
        if spike:
            zoo.scale_lr(poison.lr_factor)(run)  # type: ignore[union-attr, arg-type]
        loss = _step_left_out(run, i) if i in leave_out else run.step(i)
        if spike:  # the learning rates as they were, exactly (x100 / 100 need not round-trip)
            for g, lr in zip(run.optimizer.param_groups, lrs, strict=True):
                g["lr"] = lr
        if mon is not None:
            mon.step(loss=loss)
        run.finish()
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    out = Trained(losses, list(mon.skipped_steps) if mon else [], seconds, judged, mon.errors if mon else 0)
    if mon is not None and keep_steps:
        out.stats = mon._merged_steps()
    if data is not None:
        out.held_out = evaluate(run, data.held_out())
        out.state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    if mon is not None:
        mon.close()
    return out


def _record(guard: Any, judged: list[tuple[float, float | None, float | None]]) -> None:
    """Note each verdict's norm, limit and jump over the history's median (log units), for the headroom."""
    verdict = guard.verdict

    def noted(norm: float, **kw: Any) -> Any:
        v = verdict(norm, **kw)
        h = np.asarray(guard._history)
        jump = math.log(norm) - float(np.median(h)) if len(h) and norm > 0 and math.isfinite(norm) else None
        judged.append((norm, v.limit, jump))
        return v

    guard.verdict = noted


def healthy(seeds: int, timing: bool) -> list[dict[str, Any]]:
    rows = []
    for sc in (s for s in zoo.SCENARIOS if s.kind == "healthy"):
        for seed in range(seeds):
            on = train(sc, seed, GuardConfig())
            row: dict[str, Any] = {"scenario": sc.name, "seed": seed, "steps": sc.steps, "skips": len(on.skipped),
                                   "skipped": on.skipped, "errors": on.errors}
            room = [lim / n for n, lim, _ in on.judged if lim is not None and math.isfinite(n) and n > 0]
            jumps = [j for _, _, j in on.judged if j is not None]
            row["norms"] = [n for n, _, _ in on.judged]  # what the guard judged (--json), for other configs
            row["headroom"] = round(min(room), 2) if room else None
            row["max_jump"] = round(math.exp(max(jumps)), 2) if jumps else None
            if timing and seed == 0 and sc.name in TIMED:
                off = train(sc, seed, None)
                on2 = train(sc, seed, GuardConfig())
                off2 = train(sc, seed, None)
                row["time_ratio"] = round((on.seconds + on2.seconds) / (off.seconds + off2.seconds), 3)
                row["bitwise_equal"] = on.losses == off.losses
            rows.append(row)
            print(f"healthy {sc.name:24s} seed {seed}: skips {row['skips']}, headroom {row['headroom']}x, "
                  f"largest jump {row['max_jump']}x, time ratio {row.get('time_ratio', '-')}", file=sys.stderr)
    return rows


#: The noise band: the clean run's final loss over this many other data orders (same initialisation), and over
#: this many runs with two random batches left out (same data order).
RESEEDS, LEAVE_OUTS = 3, 3


def _rel(a: float, b: float) -> float | None:
    """``a`` against ``b`` (a / b - 1), None where either is not finite."""
    return round(a / b - 1, 4) if math.isfinite(a) and math.isfinite(b) and b > 0 else None


def noise_band(sc: zoo.Scenario, data: Data, seed: int, clean: float) -> dict[str, Any]:
    """How far the clean run's final loss moves by itself: over ``RESEEDS`` other data orders, and over
    ``LEAVE_OUTS`` runs with two random batches (steps drawn as the poisons' are) left out."""
    reseeded = [_rel(train(sc, seed, None, data=data, data_seed=1000 * (k + 1) + seed).final(), clean)
                for k in range(RESEEDS)]
    left = [_rel(train(sc, seed, None, data=data,
                       leave_out=_spread(2)(random.Random(f"{sc.name}-leave-{seed}-{k}"), sc.steps)).final(), clean)
            for k in range(LEAVE_OUTS)]
    return {"scenario": sc.name, "seed": seed, "clean": round(clean, 4), "reseeded": reseeded, "left_out": left,
            "band": max(abs(v) for v in reseeded + left if v is not None)}


def lengthened(sc: zoo.Scenario, steps: int | None) -> zoo.Scenario:
    """``sc`` trained for ``steps`` (None: its own length); the transformer's warm-up and cosine schedule
    stretched to it."""
    if steps is None:
        return sc
    build = (lambda seed: zoo.transformer(seed, steps=steps)) if sc.build is zoo.transformer else sc.build
    return dataclasses.replace(sc, steps=steps, build=build)


def poisoned(seeds: int, steps: int | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every poisoned run (trained for ``steps``, default its own length) trained four ways (clean, unguarded,
    guarded, clean without the guarded run's skipped batches), and the clean runs' noise bands: (poison rows,
    band rows)."""
    rows, bands = [], []
    for name in POISONED_MODELS:
        sc, data = lengthened(zoo.BY_NAME[name], steps), DATA[name]
        for seed in range(seeds):
            clean = train(sc, seed, None, data=data)
            c = clean.final()
            bands.append(noise_band(sc, data, seed, c))
            print(f"{name:12s} noise band seed {seed}: {bands[-1]}", file=sys.stderr)
            for poison in POISONS:
                hit = poison.steps(random.Random(f"{name}-{poison.name}-{seed}"), sc.steps)
                bad = train(sc, seed, None, poison, hit, data=data)
                guarded = train(sc, seed, GuardConfig(), poison, hit, data=data)
                skipped = [s for s, _ in guarded.skipped]
                without = train(sc, seed, None, data=data, leave_out=skipped)
                u, g, w = bad.final(), guarded.final(), without.final()
                vs = _rel(g, c)
                rows.append({
                    "scenario": name, "poison": poison.name, "seed": seed, "hit": hit,
                    "clean": round(c, 4), "unguarded": round(u, 4) if math.isfinite(u) else "diverged",
                    "guarded": round(g, 4) if math.isfinite(g) else "diverged",
                    "without_skipped": round(w, 4),
                    "guarded_vs_clean": vs, "unguarded_vs_clean": _rel(u, c),
                    "without_vs_clean": _rel(w, c), "guarded_vs_without": _rel(g, w),
                    "guarded_equals_without": guarded.same_weights(without),
                    "band": bands[-1]["band"], "within_band": vs is not None and abs(vs) <= bands[-1]["band"],
                    "skipped": len(skipped), "poison_skipped": sum(s in hit for s in skipped),
                    "other_skips": sum(s not in hit for s in skipped),
                })
                print(f"{name:12s} {poison.name:14s} seed {seed}: {rows[-1]}", file=sys.stderr)
    return rows, bands


def _no_norms(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "norms"} for r in rows]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:+.1f}%"


def markdown(poison_rows: list[dict[str, Any]], healthy_rows: list[dict[str, Any]],
             bands: list[dict[str, Any]] | None = None) -> str:
    out = []
    if poison_rows:
        out += ["| run | poison | seed | poisoned steps | clean | unguarded | guarded | clean without the skipped "
                "| guarded = without (bitwise) | without vs clean | guarded vs clean | noise band | "
                "skipped (poisoned / other) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in poison_rows:
            out.append(f"| {r['scenario']} | {r['poison']} | {r['seed']} | {','.join(map(str, r['hit']))} | "
                       f"{r['clean']} | {r['unguarded']} | {r['guarded']} | {r['without_skipped']} | "
                       f"{'yes' if r['guarded_equals_without'] else _pct(r['guarded_vs_without'])} | "
                       f"{_pct(r['without_vs_clean'])} | {_pct(r['guarded_vs_clean'])} | "
                       f"+-{100 * r['band']:.1f}% | {r['poison_skipped']} / {r['other_skips']} |")
        within2 = sum(r["guarded_vs_clean"] is not None and abs(r["guarded_vs_clean"]) <= 0.02 for r in poison_rows)
        out += ["", f"guarded within 2% of clean: {within2} of {len(poison_rows)}; within the noise band: "
                f"{sum(r['within_band'] for r in poison_rows)} of {len(poison_rows)}; guarded bitwise equal to clean "
                f"without the skipped batches: {sum(r['guarded_equals_without'] for r in poison_rows)} of "
                f"{len(poison_rows)}", ""]
    if bands:
        out += ["| run | seed | clean final loss | other data orders | two random batches left out | band |",
                "|---|---|---|---|---|---|"]
        out += [f"| {b['scenario']} | {b['seed']} | {b['clean']} | {', '.join(map(_pct, b['reseeded']))} | "
                f"{', '.join(map(_pct, b['left_out']))} | +-{100 * b['band']:.1f}% |" for b in bands]
        out.append("")
    if healthy_rows:
        out += ["| healthy run | seed | steps | false skips | smallest headroom | largest jump | time ratio on/off |"
                " bitwise equal |", "|---|---|---|---|---|---|---|---|"]
        for r in healthy_rows:
            out.append(f"| {r['scenario']} | {r['seed']} | {r['steps']} | {r['skips']} | {r['headroom']}x | "
                       f"{r['max_jump']}x | {r.get('time_ratio', '-')} | {r.get('bitwise_equal', '-')} |")
        steps = sum(r["steps"] for r in healthy_rows)
        skips = sum(r["skips"] for r in healthy_rows)
        ratios = [r["time_ratio"] for r in healthy_rows if "time_ratio" in r]
        out += ["", f"healthy: {len(healthy_rows)} runs, {steps} steps, {skips} false skips; smallest headroom "
                f"{min(r['headroom'] for r in healthy_rows if r['headroom'] is not None)}x; step-time ratio "
                f"guard on/off: median {np.median(ratios):.3f}" if ratios else ""]
    return "\n".join(out)


# ---- update norms: an earlier warning? ---------------------------------------------------------------------------
#: The signals compared, each a number per step from a monitor's merged step (deep_every=1).
SIGNALS: dict[str, Callable[[Any], float]] = {
    "grad_norm": lambda s: float(s.global_norm),
    "update_norm": lambda s: math.sqrt(float(np.sum(s.grads.update_sq))) if s.grads.update_sq is not None
    else float("nan"),
    "update_ratio": lambda s: math.sqrt(float(np.sum(s.grads.update_sq)) / float(np.sum(s.grads.weight_sq)))
    if s.grads.update_sq is not None and s.grads.weight_sq is not None and np.sum(s.grads.weight_sq) > 0
    else float("nan"),
}
BASELINE = 20  # steps before a poisoned one whose median is the baseline
JUMP = 3.0  # a signal "jumps" at the first step it stands this many times above its baseline (or turns NaN/Inf)
LOOK = (0, 6)  # steps from the poisoned one searched for the jump (nothing precedes an injected poison)


def _jump(series: dict[int, float], at: int) -> tuple[int | None, float | None]:
    """(first step offset from ``at`` where ``series`` jumps, its factor over the baseline at ``at``)."""
    window = range(at + LOOK[0] - BASELINE, at + LOOK[0])
    base = [series[t] for t in window if math.isfinite(series.get(t, math.nan))]
    if not base:
        return None, None
    median = float(np.median(base))
    first = None
    for t in range(at + LOOK[0], at + LOOK[1] + 1):
        v = series.get(t, math.nan)
        if not math.isfinite(v) or v > JUMP * median:
            first = t - at
            break
    v = series.get(at, math.nan)
    return first, (v / median if math.isfinite(v) and median > 0 else float("inf"))


def update_norms(seeds: int) -> list[dict[str, Any]]:
    """Each poisoned zoo run, unguarded, with deep statistics on every step: for the gradient norm, the update norm,
    the update/weight ratio and the loss of each step, at which step (from the poisoned one) it first jumps
    ``JUMP`` times above the median of the ``BASELINE`` steps before, and its factor at the poisoned step. The
    loss of step t is the loss before step t's update: the damage of an update at t shows in the loss at t+1."""
    rows = []
    for name in POISONED_MODELS:
        sc = zoo.BY_NAME[name]
        for poison in POISONS:
            for seed in range(seeds):
                hit = poison.steps(random.Random(f"{name}-{poison.name}-{seed}"), sc.steps)
                bad = train(sc, seed, None, poison, hit, deep_every=1, keep_steps=True)
                series = {k: {s.step: f(s) for s in bad.stats} for k, f in SIGNALS.items()}
                series["loss"] = dict(enumerate(bad.losses))
                opt = type(sc.make(seed).optimizer).__name__
                for at in hit:
                    if _jump(series["grad_norm"], at)[0] is None and not math.isfinite(series["loss"][at - 1]):
                        continue  # diverged (NaN) at an earlier poison: nothing left to compare
                    earlier = [at - h for h in hit if 0 < at - h <= BASELINE]
                    row: dict[str, Any] = {"scenario": name, "optimizer": opt, "poison": poison.name, "seed": seed,
                                           "step": at, "after_poison": earlier[-1] if earlier else None}
                    for k, ser in series.items():
                        row[f"{k}_first"], row[f"{k}_factor"] = _jump(ser, at)
                    rows.append(row)
                    print(f"{name:12s} {poison.name:14s} step {at}: {row}", file=sys.stderr)
    return rows


def update_markdown(rows: list[dict[str, Any]]) -> str:
    def cell(r: dict[str, Any], k: str) -> str:
        first, factor = r[f"{k}_first"], r[f"{k}_factor"]
        when = "-" if first is None else f"{first:+d}"
        size = "NaN" if factor is None or not math.isfinite(factor) else f"{factor:.3g}x"
        return f"{when} ({size})"

    keys = ("grad_norm", "update_norm", "update_ratio", "loss")
    out = ["| run | optimizer | poison | step | " + " | ".join(keys) + " |", "|---|---|---|---|" + "---|" * len(keys)]
    out += [f"| {r['scenario']} | {r['optimizer']} | {r['poison']} | {r['step']}"
            + ("" if r["after_poison"] is None else f" ({r['after_poison']} after one)") + " | "
            + " | ".join(cell(r, k) for k in keys) + " |" for r in rows]
    out += ["", f"each cell: the first step, from the poisoned one, where the signal stands {JUMP:g}x above the median "
            f"of the {BASELINE} steps before (or is NaN/Inf; - : not within {LOOK[1]} steps), and (its factor at the "
            "poisoned step); a run already NaN from an earlier poison is left out"]
    return "\n".join(out)


# ---- the sharded guard's collective -----------------------------------------------------------------------------
def _collective_worker(rank: int, port: int, calls: int, layers: int, queue: Any) -> None:
    import os

    import torch.distributed as dist

    from gfservice.training.step_guard import GuardInput, agree

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    sums = np.random.default_rng(rank).random(layers)
    got = GuardInput(float(np.sqrt(sums.sum())), False, np.sqrt(sums), sums)
    sharded = [True] * layers
    one = torch.zeros(1, dtype=torch.float64)
    calls_of: dict[str, Callable[[], Any]] = {
        "bare": lambda: dist.all_reduce(one),  # the floor: any all-reduce of one number
        "agree": lambda: agree(got, sharded, 0.5),
        "layers": lambda: agree(got, sharded, 0.5, layers=True)}
    result = {}
    for key, call in calls_of.items():
        times = []
        for _ in range(calls):
            dist.barrier()  # both ranks enter together: the time is the collective's, not the other rank's lag
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        result[key] = (float(np.median(times)) * 1e6, float(np.percentile(times, 90)) * 1e6)
    if rank == 0:
        queue.put(result)
    dist.barrier()
    os._exit(0)  # no destroy_process_group(): gloo's can deadlock in its destructor


def collective(calls: int = 2000, layers: int = 100) -> str:
    """Microseconds per step of :func:`~gfservice.training.step_guard.agree` (the one all-reduce of a sharded
    job's guard) on 2 gloo ranks on CPU: median and 90th percentile over ``calls`` steps, with and without the
    per-layer sums."""
    import socket

    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.start_processes(_collective_worker, args=(port, calls, layers, queue), nprocs=2,
                                          start_method="spawn")
    res = queue.get()
    return "\n".join([
        f"guard all-reduce, 2 gloo ranks on CPU, {calls} steps, {layers} layers:",
        f"  agree(), 4 numbers (global norm, NaN/Inf flags): median {res['agree'][0]:.0f} us, "
        f"p90 {res['agree'][1]:.0f} us",
        f"  agree(), with per-layer sums ({layers + 4} numbers): median {res['layers'][0]:.0f} us, "
        f"p90 {res['layers'][1]:.0f} us",
        f"  a bare all_reduce of one number: median {res['bare'][0]:.0f} us, p90 {res['bare'][1]:.0f} us"])


def _step_in_rotation(runs: dict[Any, tuple[zoo.Run, Any]], steps: int, shift: int,
                      times: dict[Any, list[float]]) -> None:
    """Step every (run, monitor) of ``runs`` ``steps`` times, one step of each in turn, the order rotated each step
    (so that none always goes first), noting each iteration's time under its key; then close the monitors."""
    order = list(runs)
    for i in range(steps):
        k = (i + shift) % len(order)
        for key in order[k:] + order[:k]:
            run, mon = runs[key]
            t0 = time.perf_counter()
            loss = run.step(i)
            mon.step(loss=loss)
            run.finish()
            times[key].append(time.perf_counter() - t0)
    for _, mon in runs.values():
        mon.close()


def step_time(rounds: int = 3) -> str:
    """Guard on against guard off, step by step: two copies of each timed run (same seed, same monitor otherwise)
    stepped alternately, so that both see the same machine; the ratio of their median iteration times (forward,
    backward, optimizer step, ``monitor.step``)."""
    lines = ["| run | steps x rounds | median iteration, guard off | guard on | ratio on/off (median) | ratio (mean) |",
             "|---|---|---|---|---|---|"]
    ratios = []
    for name in TIMED:
        sc = zoo.BY_NAME[name]
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            pair = {}
            for on in (False, True):
                run = sc.make(0)
                mon = gfservice.monitor(run.model, run.optimizer, run=f"time-{name}-{r}-{on}", service=None,
                                        scaler=run.scaler, guard=GuardConfig() if on else None, sinks=[])
                pair[on] = (run, mon)
            _step_in_rotation(pair, sc.steps, r, times)
        off, on_ = np.median(times[False]), np.median(times[True])
        ratios.append(on_ / off)
        lines.append(f"| {name} | {sc.steps} x {rounds} | {off * 1e3:.3f} ms | {on_ * 1e3:.3f} ms | "
                     f"{on_ / off:.3f} | {np.mean(times[True]) / np.mean(times[False]):.3f} |")
    lines.append(f"\nmedian of the ratios: {np.median(ratios):.3f}")
    return "\n".join(lines)


#: Runs timed with fused AdamW: guard off, guard with the host verdict, guard with the verdict on the device.
FUSED_TIMED = ("mlp", "cnn_bn", "resmlp", "transformer")
FUSED_ARMS: dict[str, GuardConfig | None] = {
    "off": None, "host": GuardConfig(device_verdict=False), "device": GuardConfig(device_verdict=True)}


def fused_step_time(rounds: int = 2) -> str:
    """The two guard paths of a fused optimizer (``AdamW(fused=True)`` in place of each run's own): guard off, the
    host verdict (``device_verdict=False``: the statistics copied to the host before the step) and the verdict on
    the device (``found_inf``), three copies of each run stepped in rotation; the median iteration time of each."""
    lines = ["| run | steps x rounds | median iteration, guard off | host verdict | device verdict | host/off | "
             "device/off |", "|---|---|---|---|---|---|---|"]
    ratios: dict[str, list[float]] = {"host": [], "device": []}
    for name in FUSED_TIMED:
        sc = zoo.BY_NAME[name]
        times: dict[str, list[float]] = {arm: [] for arm in FUSED_ARMS}
        for r in range(rounds):
            runs = {}
            for arm, cfg in FUSED_ARMS.items():
                run = sc.make(0)
                run.optimizer = torch.optim.AdamW(run.model.parameters(), lr=1e-3, fused=True)
                run.scheduler = None
                mon = gfservice.monitor(run.model, run.optimizer, run=f"fused-{name}-{r}-{arm}", service=None,
                                        guard=cfg, sinks=[])
                runs[arm] = (run, mon)
            _step_in_rotation(runs, sc.steps, r, times)
        med = {arm: float(np.median(t)) for arm, t in times.items()}
        for arm in ratios:
            ratios[arm].append(med[arm] / med["off"])
        lines.append(f"| {name} | {sc.steps} x {rounds} | {med['off'] * 1e3:.3f} ms | {med['host'] * 1e3:.3f} ms | "
                     f"{med['device'] * 1e3:.3f} ms | {med['host'] / med['off']:.3f} | "
                     f"{med['device'] / med['off']:.3f} |")
    lines.append(f"\nmedian of the ratios: host/off {np.median(ratios['host']):.3f}, "
                 f"device/off {np.median(ratios['device']):.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--healthy-only", action="store_true")
    p.add_argument("--poisoned-only", action="store_true")
    p.add_argument("--steps", type=int, default=None,
                   help="train the poisoned runs this many steps (default: each zoo run's own, 200 to 300)")
    p.add_argument("--no-timing", action="store_true", help="skip the guard-on/off step-time runs")
    p.add_argument("--json", default=None)
    p.add_argument("--collective", action="store_true", help="time the sharded guard's all-reduce only")
    p.add_argument("--step-time", action="store_true",
                   help="only: guard-on against guard-off iteration time, the two runs stepped alternately")
    p.add_argument("--fused", action="store_true",
                   help="with --step-time: fused AdamW, guard off against the host and the device verdict")
    p.add_argument("--update-norms", action="store_true",
                   help="only: when do update norms jump on poisoned runs, against gradient norm and loss")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.collective:
        print(collective())
        return 0
    if args.step_time:
        print(fused_step_time() if args.fused else step_time())
        return 0
    if args.update_norms:
        rows = update_norms(args.seeds)
        print(update_markdown(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    t0 = time.perf_counter()
    pr, bands = ([], []) if args.healthy_only else poisoned(args.seeds, args.steps)
    hr = [] if args.poisoned_only else healthy(args.seeds, not args.no_timing)
    print(markdown(pr, hr, bands))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; GuardConfig defaults: {GuardConfig().model_dump()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"poisoned": pr, "noise_bands": bands, "healthy": hr, "config": GuardConfig().model_dump()},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
