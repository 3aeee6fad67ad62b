"""Guard mode on the evaluation zoo: poisoned runs trained clean, poisoned unguarded and poisoned guarded, and
every healthy run guarded (false skips, and how far its steps stayed from the guard's limit).

```bash
.venv/bin/python benchmarks/guard.py                  # default: about 3 minutes on 2 cores
.venv/bin/python benchmarks/guard.py --seeds 3        # more seeds
.venv/bin/python benchmarks/guard.py --healthy-only --seeds 3 --json out.json
```

Poisons (``POISONS``), injected into zoo runs at steps drawn from the seed (after the guard's warm-up):

- ``corrupt_x1000``: three batches whose loss (and so gradient) is 1000x (a corrupted batch; token models cannot
  take scaled inputs, so the loss carries the corruption);
- ``nan_batch``: two batches whose loss is NaN (a NaN input value, a log of 0);
- ``lr_spike``: the learning rate x100 for one step (a scheduler bug). Its damage is done by that step's
  normal-looking gradient; the guard sees only the explosion of the steps after it.

Per poisoned run: the final loss (mean of the last 20 steps' losses) of clean, unguarded and guarded, the guarded
one against the clean one, the steps skipped, poisoned steps skipped and other skips. Per healthy run: skips
(false skips), the smallest headroom (the guard's limit over the step's norm: below 1 a step is skipped) and the
largest jump over the history's median. The step-time ratio guard-on / guard-off (the same monitor otherwise)
is measured on the healthy runs, run in alternation in one process.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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
LAST = 20  # the final loss: mean of the last LAST steps
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


@dataclass
class Trained:
    losses: list[float]
    skipped: list[tuple[int, str]]
    seconds: float
    #: (norm, limit) of every judged step (guarded runs).
    judged: list[tuple[float, float | None, float | None]] = field(default_factory=list)
    errors: int = 0

    def final(self) -> float:
        tail = [v for v in self.losses[-LAST:] if math.isfinite(v)]
        return float(np.mean(tail)) if len(tail) == LAST else float("nan")


def train(sc: zoo.Scenario, seed: int, guard: GuardConfig | None, poison: Poison | None = None,
          hit: list[int] | None = None, monitor: bool = True) -> Trained:
    """Train ``sc`` with ``seed`` under a monitor (guard on or off), with ``poison`` at the steps ``hit``."""
    run = sc.make(seed)
    hit_set = set(hit or [])
    if poison is not None and poison.loss is not None:
        run.fault = zoo.Fault(-1, loss=poison.loss)  # armed by hand below
    mon = gfservice.monitor(run.model, run.optimizer, run=f"guard-{sc.name}-{seed}", service=None,
                            scaler=run.scaler, guard=guard, sinks=[]) if monitor else None
    judged: list[tuple[float, float | None, float | None]] = []
    if mon is not None and mon.guard is not None:
        _record(mon.guard, judged)
    losses: list[float] = []
    t0 = time.perf_counter()
    for i in range(sc.steps):
        if poison is not None and run.fault is not None:
            run.fault.at = i if i in hit_set else -1
        spike = poison is not None and poison.lr_factor is not None and i in hit_set
        if spike:
            zoo.scale_lr(poison.lr_factor)(run)  # type: ignore[union-attr, arg-type]
        loss = run.step(i)
        if spike:
            zoo.scale_lr(1.0 / poison.lr_factor)(run)  # type: ignore[union-attr, operator]
        if mon is not None:
            mon.step(loss=loss)
        run.finish()
        losses.append(float(loss))
    seconds = time.perf_counter() - t0
    out = Trained(losses, list(mon.skipped_steps) if mon else [], seconds, judged, mon.errors if mon else 0)
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


def poisoned(seeds: int) -> list[dict[str, Any]]:
    rows = []
    for name in POISONED_MODELS:
        sc = zoo.BY_NAME[name]
        clean = {seed: train(sc, seed, None) for seed in range(seeds)}
        for poison in POISONS:
            for seed in range(seeds):
                hit = poison.steps(random.Random(f"{name}-{poison.name}-{seed}"), sc.steps)
                bad = train(sc, seed, None, poison, hit)
                guarded = train(sc, seed, GuardConfig(), poison, hit)
                skipped = [s for s, _ in guarded.skipped]
                c, u, g = clean[seed].final(), bad.final(), guarded.final()
                rows.append({
                    "scenario": name, "poison": poison.name, "seed": seed, "hit": hit,
                    "clean": round(c, 4), "unguarded": round(u, 4) if math.isfinite(u) else "diverged",
                    "guarded": round(g, 4) if math.isfinite(g) else "diverged",
                    "guarded_vs_clean": round(g / c - 1, 4) if math.isfinite(g) and c > 0 else None,
                    "unguarded_vs_clean": round(u / c - 1, 4) if math.isfinite(u) and c > 0 else None,
                    "skipped": len(skipped), "poison_skipped": sum(s in hit for s in skipped),
                    "other_skips": sum(s not in hit for s in skipped),
                })
                print(f"{name:12s} {poison.name:14s} seed {seed}: {rows[-1]}", file=sys.stderr)
    return rows


def _no_norms(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "norms"} for r in rows]


def markdown(poison_rows: list[dict[str, Any]], healthy_rows: list[dict[str, Any]]) -> str:
    out = []
    if poison_rows:
        out += ["| run | poison | seed | poisoned steps | clean | unguarded | guarded | guarded vs clean | "
                "skipped (poisoned / other) |", "|---|---|---|---|---|---|---|---|---|"]
        for r in poison_rows:
            vs = "-" if r["guarded_vs_clean"] is None else f"{100 * r['guarded_vs_clean']:+.1f}%"
            out.append(f"| {r['scenario']} | {r['poison']} | {r['seed']} | {','.join(map(str, r['hit']))} | "
                       f"{r['clean']} | {r['unguarded']} | {r['guarded']} | {vs} | "
                       f"{r['poison_skipped']} / {r['other_skips']} |")
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--healthy-only", action="store_true")
    p.add_argument("--poisoned-only", action="store_true")
    p.add_argument("--no-timing", action="store_true", help="skip the guard-on/off step-time runs")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pr = [] if args.healthy_only else poisoned(args.seeds)
    hr = [] if args.poisoned_only else healthy(args.seeds, not args.no_timing)
    print(markdown(pr, hr))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s; GuardConfig defaults: {GuardConfig().model_dump()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"poisoned": pr, "healthy": hr, "config": GuardConfig().model_dump()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
