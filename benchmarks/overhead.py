"""Overhead of ``gfservice.monitor`` on a ~20M-parameter training step (AdamW, CPU, two threads).

Measures, in one run and interleaved so that machine noise hits every variant alike:

- ``baseline``: the training step alone (forward, backward, ``AdamW.step``, ``zero_grad``);
- ``core``: the same with ``gfservice.monitor(..., every=1, deep_every=0)``: core statistics every step;
- ``deep``: ``every=1, deep_every=50``: core every step, deep statistics and update norms every 50th;
- ``floor``: no monitor, one fused ``torch._foreach_norm`` over all gradients per step (the least any
  gradient monitor can cost: one read of the gradients).

Each round runs ``--steps`` steps (default 1) of every variant, in an order that rotates from round to round.
A variant's ratio is the median over rounds of (its median step time in the round / the baseline's in the
same round); the ratio of 20th percentiles is shown too. Deep steps (1 in ``deep_every``) are timed apart
and amortized: the other steps plus the deep steps' extra time inside the monitor divided by ``deep_every``.
Beside the step ratio stands the time spent inside the monitor's own calls and hooks
(``Monitor.overhead_s``, per step), which noise disturbs far less.

Then the micro-choices of ``gfservice.training.collect`` are timed on the model's real gradients, as are the
pieces of ``Monitor.step`` (collection, host unpacking, ``StepReport``, aggregator and detectors).

Run ``python benchmarks/overhead.py`` (about 5 minutes) or ``--quick`` (about 1 minute);
``--json PATH`` writes every figure; ``--profile`` adds a cProfile of ``Monitor.step``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import platform
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gfservice
from gfservice import Monitor
from gfservice import monitor as gf_monitor  # the public entry point, as a training script calls it
from gfservice.training import collect

TARGETS = {"core": 1.03, "deep": 1.05}
VARIANTS = ("baseline", "core", "deep", "floor")
LABELS = {
    "baseline": "baseline (no monitor)",
    "core": "core stats every step",
    "deep": "core every step + deep every 50",
    "floor": "floor: one _foreach_norm pass",
}


# ---- the model ----------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """A GPT-style decoder: token and position embeddings, pre-norm blocks, untied output head."""

    vocab: int = 2048
    width: int = 512
    depth: int = 6
    heads: int = 8
    seq: int = 128
    batch: int = 8


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self, s: ModelSpec):
        super().__init__()
        self.tok = nn.Embedding(s.vocab, s.width)
        self.pos = nn.Parameter(torch.randn(s.seq, s.width) * 0.02)
        self.blocks = nn.ModuleList(Block(s.width, s.heads) for _ in range(s.depth))
        self.ln = nn.LayerNorm(s.width)
        self.head = nn.Linear(s.width, s.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def make_batches(spec: ModelSpec, n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, spec.vocab, (spec.batch, spec.seq + 1), generator=g) for _ in range(n)]


def lm_loss(model: nn.Module, batch: torch.Tensor, vocab: int) -> torch.Tensor:
    return F.cross_entropy(model(batch[:, :-1]).reshape(-1, vocab), batch[:, 1:].reshape(-1))


# ---- one variant: its own model, optimizer and (maybe) monitor ---------------------------------------
@dataclass
class Record:
    round: int
    step_s: float
    inner_s: float  # time inside the monitor (or the floor's norm pass)
    deep: bool
    fwd_bwd_s: float
    opt_s: float


@dataclass
class Variant:
    name: str
    spec: ModelSpec
    batches: list[torch.Tensor]
    seed: int
    deep_every: int = 0
    model: nn.Module = field(init=False)
    opt: torch.optim.Optimizer = field(init=False)
    monitor: Monitor | None = field(init=False, default=None)
    records: list[Record] = field(init=False, default_factory=list)
    _i: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        torch.manual_seed(self.seed)
        self.model = TinyLM(self.spec)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, weight_decay=0.1)
        if self.name in ("core", "deep"):
            self.monitor = gf_monitor(self.model, self.opt, run=f"bench-{self.name}", service=None,
                                      every=1, deep_every=self.deep_every)

    def step(self, rnd: int | None) -> None:
        """One training step; recorded unless ``rnd`` is None (warm-up)."""
        batch = self.batches[self._i % len(self.batches)]
        self._i += 1
        mon = self.monitor
        deep = mon is not None and mon.is_deep(mon.steps)
        o0 = mon.overhead_s if mon is not None else 0.0
        t0 = time.perf_counter()
        loss = lm_loss(self.model, batch, self.spec.vocab)
        loss.backward()
        t1 = time.perf_counter()
        self.opt.step()
        t2 = time.perf_counter()
        inner = 0.0
        if mon is not None:
            mon.step(loss=loss)
            inner = mon.overhead_s - o0
        elif self.name == "floor":
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            torch.stack(torch._foreach_norm(grads)).numpy()
            inner = time.perf_counter() - t2
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if rnd is not None:
            self.records.append(Record(rnd, t3 - t0, inner, deep, t1 - t0, t2 - t1))


# ---- statistics ---------------------------------------------------------------------------------
def med(xs) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else math.nan


def quartiles(xs) -> tuple[float, float]:
    xs = list(xs)
    if len(xs) < 2:
        return (xs[0], xs[0]) if xs else (math.nan, math.nan)
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def pct(xs, q: float) -> float:
    """The ``q``-th percentile of ``xs`` (NaN when empty)."""
    xs = list(xs)
    return float(np.percentile(xs, q)) if xs else math.nan


def summarize(variants: dict[str, Variant], deep_every: int) -> dict[str, dict[str, Any]]:
    """Per variant: step times and ratios (paired per round, and of 20th percentiles), monitor time.

    Every variant sees the same mix of quiet and contended moments (interleaved step by step), so any
    quantile of its step times compares with the same quantile of the baseline's. The paired median, which
    also cancels slow drift, carries the verdict; the 20th percentiles are a second view.
    """
    base = variants["baseline"].records
    rounds = sorted({r.round for r in base})
    base_by_round = {k: med(r.step_s for r in base if r.round == k) for k in rounds}
    base_ms = 1e3 * med(r.step_s for r in base)
    base_p20 = 1e3 * pct((r.step_s for r in base), 20)
    out: dict[str, dict[str, Any]] = {}
    for name, v in variants.items():
        regular = [r for r in v.records if not r.deep]
        deep = [r for r in v.records if r.deep]
        ratios = [med(r.step_s for r in regular if r.round == k) / base_by_round[k] for k in rounds]
        ratios = [x for x in ratios if math.isfinite(x)]
        step_ms = 1e3 * med(r.step_s for r in regular)
        step_p20 = 1e3 * pct((r.step_s for r in regular), 20)
        inner_ms = 1e3 * med(r.inner_s for r in regular)
        inner_p20 = 1e3 * pct((r.inner_s for r in regular), 20)
        lo, hi = quartiles(ratios)
        extra = extra_inner = 0.0
        label = LABELS[name].replace("every 50", f"every {deep_every}")
        row: dict[str, Any] = {"label": label, "steps": len(v.records), "rounds": len(rounds)}
        if deep:
            # A deep step's extra cost, spread over the deep_every steps it stands for. On the CPU all of it
            # is spent inside the monitor (weight snapshot, deep reductions), and the monitor's own time of
            # the few deep steps is far less noisy than their step times, so that is what is spread.
            extra_inner = (1e3 * med(r.inner_s for r in deep) - inner_ms) / deep_every
            extra = extra_inner
            row.update(deep_steps=len(deep), deep_inner_extra_ms=extra_inner * deep_every,
                       deep_step_extra_ms=1e3 * med(r.step_s for r in deep) - step_ms)
        elif name == "deep":
            row["note"] = "no deep step was measured: run longer"
        row.update(
            median_step_ms=step_ms + extra,
            p20_step_ms=step_p20 + extra,
            ratio=med(ratios) + extra / base_ms,
            ratio_p25=lo + extra / base_ms,
            ratio_p75=hi + extra / base_ms,
            round_ratios=ratios,
            ratio_q20=(step_p20 + extra) / base_p20,
            inner_ms_per_step=inner_ms + extra_inner,
            inner_p20_ms=inner_p20 + extra_inner,
        )
        if name == "baseline":
            row["fwd_bwd_ms"] = 1e3 * med(r.fwd_bwd_s for r in v.records)
            row["optimizer_ms"] = 1e3 * med(r.opt_s for r in v.records)
            row["fwd_bwd_share"] = med(r.fwd_bwd_s / r.step_s for r in v.records)
            row["p80_step_ms"] = 1e3 * pct((r.step_s for r in v.records), 80)
        row["records"] = [[r.round, 1e3 * r.step_s, 1e3 * r.inner_s, r.deep, 1e3 * r.fwd_bwd_s, 1e3 * r.opt_s]
                          for r in v.records]
        if v.monitor is not None:
            row["monitor_overhead_s_per_step_raw_ms"] = 1e3 * v.monitor.overhead_s / max(v.monitor.steps, 1)
            row["monitor_errors"] = v.monitor.errors
            row["findings"] = [f"{f.detector}/{f.key}@{f.first_step}" for f in v.monitor.findings]
        # Both 20th percentiles estimate the quiet-machine cost: a median step time on a loaded machine is
        # inflated by contention far more than the short monitor calls are, which would flatter the ratio.
        row["inner_ratio"] = 1.0 + row["inner_p20_ms"] / base_p20 if name != "baseline" else 1.0
        out[name] = row
    return out


# ---- micro-benchmarks on real gradients ----------------------------------------------------------
def time_ops(ops: dict[str, Callable[[], Any]], reps: int) -> dict[str, dict[str, Any]]:
    """Median and minimum milliseconds of each op, the ops interleaved within each repetition.

    On a loaded machine the minimum is the closer estimate of an op's own cost; the median shows the noise.
    """
    failed: dict[str, dict[str, Any]] = {}
    for k, fn in list(ops.items()):  # warm-up; an op that fails (gfservice internals moved) is reported
        try:
            fn()
        except Exception as exc:
            failed[k] = {"error": f"{type(exc).__name__}: {exc}"}
    ops = {k: fn for k, fn in ops.items() if k not in failed}
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(reps):
        for k, fn in ops.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    out: dict[str, dict[str, Any]] = {k: {"median_ms": 1e3 * med(v), "min_ms": 1e3 * min(v)}
                                      for k, v in times.items()}
    return {**out, **failed}


def exp_hist_int32(g: torch.Tensor) -> torch.Tensor:
    """Candidate (not in gfservice): exponent histogram from |g|'s bits, bincount straight on int32."""
    return torch.bincount(g.float().reshape(-1).abs().view(torch.int32) >> 23, minlength=256)


def real_gradients(spec: ModelSpec, batches: list[torch.Tensor], seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model after two AdamW steps, holding the gradients of a third batch."""
    torch.manual_seed(seed)
    model = TinyLM(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    for b in batches[:2]:
        lm_loss(model, b, spec.vocab).backward()
        opt.step()
        opt.zero_grad()
    lm_loss(model, batches[2 % len(batches)], spec.vocab).backward()
    return model, opt


def compiled_core() -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """Candidate (not in gfservice): sum of squares and max |g| of each tensor in one fused pass (inductor)."""

    @torch.compile(dynamic=False)
    def core(gs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.stack([g.float().square().sum(), g.float().abs().amax()]) for g in gs]

    return core


def collection_choices(model: nn.Module, reps: int, candidates: bool = False) -> dict[str, dict[str, Any]]:
    """The reductions ``gfservice.training.collect`` chose between, and the deep ones, on ``model``'s gradients."""
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    dev = grads[0].device
    inf = float("inf")
    before = [p.detach().clone() for p in params]

    def aminmax_each():
        return torch.stack([torch.stack(torch.aminmax(g)).abs().max() for g in grads])

    ops = {
        "_foreach_norm(2)": lambda: torch._foreach_norm(grads, 2, dtype=torch.float32),
        "_foreach_norm(inf)": lambda: torch._foreach_norm(grads, inf),
        "_foreach_max(_foreach_abs)": lambda: torch._foreach_max(torch._foreach_abs(grads)),
        "aminmax per tensor": aminmax_each,
        "core = collect._core (norm(2) + max)": lambda: collect._core(grads, dev),
        "deep: _foreach_norm(1)": lambda: torch._foreach_norm(grads, 1, dtype=torch.float32),
        "deep: count_nonzero per tensor": lambda: [torch.count_nonzero(g) for g in grads],
        "deep: exponent histogram per tensor (collect._exp_hist)": lambda: [collect._exp_hist(g) for g in grads],
        "deep: exponent histogram, candidate int32 bincount": lambda: [exp_hist_int32(g) for g in grads],
        "deep = collect._deep": lambda: collect._deep(grads, dev),
        "deep: weight snapshot (clone)": lambda: [p.detach().clone() for p in params],
        "deep: weight + update norms": lambda: collect._weight_norms([p.detach() for p in params], before, dev),
    }
    compile_s = None
    if candidates:
        fused = compiled_core()
        t0 = time.perf_counter()
        fused(grads)
        compile_s = time.perf_counter() - t0
        ops["candidate: torch.compile one-pass core"] = lambda: fused(grads)
    out = time_ops(ops, reps)
    if compile_s is not None:
        out["candidate: torch.compile one-pass core"]["compile_s"] = compile_s
    return out


class Pieces:
    """Times the parts of ``Monitor.step`` by wrapping the monitor's own attributes on one instance.

    Only attributes that exist are wrapped, so the figures survive refactors; what is not wrapped shows up
    in ``rest``.
    """

    def __init__(self, mon: Monitor):
        self.mon = mon
        self.times: dict[str, list[float]] = {}
        self._wrap(mon.collector, "launch", "collector.launch (reductions on the device, packing)",
                   post=self._wrap_pending)
        self._wrap(mon.collector, "snapshot_weights", "weight snapshot (optimizer pre-hook, deep)")
        self._wrap(mon, "_report", "Monitor._report (StepReport construction)")
        self._wrap(mon.transport, "send", "transport.send (aggregator: merge + detectors)")

    def _wrap(self, obj: Any, attr: str, label: str, post: Callable[[Any], Any] | None = None) -> None:
        orig = getattr(obj, attr, None)
        if orig is None:
            return
        bucket = self.times.setdefault(label, [])

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                bucket.append(time.perf_counter() - t0)

        def timed_post(*args, **kwargs):
            return post(timed(*args, **kwargs))

        setattr(obj, attr, timed_post if post else timed)

    def _wrap_pending(self, pending: Any) -> Any:
        self._wrap(pending, "resolve", "Pending.resolve (host copy, numpy unpack)")
        return pending

    def run(self, steps: int, opt: torch.optim.Optimizer | None) -> dict[str, float]:
        """Median milliseconds per step of each piece over ``steps`` steps on fixed gradients."""
        mon = self.mon
        for v in self.times.values():
            v.clear()
        totals = []
        for _ in range(steps):
            o0 = mon.overhead_s
            if opt is not None:
                opt.step()
            mon.step(loss=1.0)
            totals.append(mon.overhead_s - o0)
        out = {k: 1e3 * med(v) for k, v in self.times.items() if v}
        # resolve runs after launch returned, not inside it: nothing is counted twice
        out["rest of Monitor.step"] = max(1e3 * med(totals) - sum(out.values()), 0.0)
        out["Monitor.step total (Monitor.overhead_s)"] = 1e3 * med(totals)
        return out


def monitor_pieces(model: nn.Module, steps: int, deep_steps: int) -> dict[str, Any]:
    """Where the time of ``Monitor.step`` goes: core steps, and deep steps (weight snapshot included)."""
    out: dict[str, Any] = {}
    try:
        core = gf_monitor(model, None, run="bench-pieces-core", service=None, every=1, deep_every=0)
        pieces = Pieces(core)
        pieces.run(2, None)  # warm-up
        out["core"] = pieces.run(steps, None)
        state = core.transport.aggregator.run_state(core.run)
        merged = max(state.last_step + 1, 1)
        out["detectors_ms"] = {k: 1e3 * v / merged for k, v in state.detector_seconds.items()}
        core.close()
        # lr=0: the weights stay as they are, the optimizer pre-hook (weight snapshot) still runs
        sgd = torch.optim.SGD(model.parameters(), lr=0.0)
        deep = gf_monitor(model, sgd, run="bench-pieces-deep", service=None, every=1, deep_every=1)
        pieces = Pieces(deep)
        pieces.run(1, sgd)
        out["deep"] = pieces.run(deep_steps, sgd)
        deep.close()
    except Exception as exc:  # internals may move; keep the main figures
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def micro(spec: ModelSpec, batches: list[torch.Tensor], reps: int, seed: int, candidates: bool = False
          ) -> dict[str, Any]:
    model, _ = real_gradients(spec, batches, seed)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return {
        "layers": len(grads),
        "grad_bytes": int(sum(g.numel() * g.element_size() for g in grads)),
        "choices_ms": collection_choices(model, reps, candidates),
        "monitor_pieces_ms": monitor_pieces(model, max(3 * reps, 10), max(reps // 2, 3)),
    }


def profile_monitor(spec: ModelSpec, batches: list[torch.Tensor], steps: int, deep_every: int, seed: int) -> str:
    """cProfile of ``Monitor.step`` over ``steps`` calls on fixed real gradients, top 25 by own time."""
    torch.manual_seed(seed)
    model = TinyLM(spec)
    lm_loss(model, batches[0], spec.vocab).backward()
    mon = gf_monitor(model, None, run="bench-profile", service=None, every=1, deep_every=deep_every)
    mon.step(loss=1.0)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        mon.step(loss=1.0)
    prof.disable()
    mon.close()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    return buf.getvalue()


# ---- the run ------------------------------------------------------------------------------------
def rounds(args: argparse.Namespace, spec: ModelSpec, batches: list[torch.Tensor]) -> dict[str, Any]:
    """The interleaved training rounds of every variant, summarized."""
    deep_every = args.deep_every
    variants = {
        name: Variant(name, spec, batches, seed=args.seed, deep_every=deep_every if name == "deep" else 0)
        for name in VARIANTS
    }
    # Place the deep variant's deep steps inside the measured steps (in the middle of round 1 and every
    # deep_every steps after), as if it resumed a run: Monitor.steps is the index of the next step.
    dmon = variants["deep"].monitor
    assert dmon is not None
    first_measured_deep = args.steps + args.steps // 2
    dmon.steps = (-(args.warmup + first_measured_deep)) % deep_every

    log("warming up")
    for v in variants.values():
        for _ in range(args.warmup):
            v.step(None)
    t_start = time.perf_counter()
    rnd = 0
    while True:
        order = VARIANTS[rnd % len(VARIANTS):] + VARIANTS[: rnd % len(VARIANTS)]
        for name in order:
            for _ in range(args.steps):
                variants[name].step(rnd)
        rnd += 1
        elapsed = time.perf_counter() - t_start
        if rnd % 5 == 0 or rnd == 1:
            log(f"round {rnd}: {elapsed:.0f}s, baseline median "
                f"{1e3 * med(r.step_s for r in variants['baseline'].records):.0f} ms")
        if rnd >= args.min_rounds and elapsed + elapsed / rnd > args.seconds:
            break
    measure_s = time.perf_counter() - t_start
    results = summarize(variants, deep_every)
    for v in variants.values():
        if v.monitor is not None:
            v.monitor.close()
    targets = []
    for name, limit in TARGETS.items():
        r = results[name]
        targets.append({
            "variant": name,
            "target": limit,
            "step_ratio": r["ratio"],
            "step_verdict": "PASS" if r["ratio"] <= limit else "MISS",
            "q20_ratio": r["ratio_q20"],
            "monitor_ratio": r["inner_ratio"],
            "monitor_verdict": "PASS" if r["inner_ratio"] <= limit else "MISS",
        })
    return {"measure_s": measure_s, "baseline_ms": results["baseline"]["median_step_ms"], "variants": results,
            "targets": targets}


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    spec = ModelSpec(batch=args.batch)
    batches = make_batches(spec)
    torch.manual_seed(args.seed)
    probe = TinyLM(spec)
    n_params = sum(p.numel() for p in probe.parameters())
    n_tensors = sum(1 for _ in probe.parameters())
    del probe
    log(f"model: {n_params / 1e6:.1f}M parameters in {n_tensors} tensors")
    out: dict[str, Any] = {
        "config": vars(args),
        "model": {
            **asdict(spec),
            "parameters": n_params,
            "tensors": n_tensors,
            "description": "GPT-style decoder (pre-norm blocks, SDPA attention, GELU MLP), untied head",
        },
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "gfservice": gfservice.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
    }
    if not args.micro_only:
        out.update(rounds(args, spec, batches))
    log("micro-benchmarks on real gradients")
    out["micro"] = micro(spec, batches, args.micro_reps, args.seed, args.candidates)
    if args.profile:
        log("profiling Monitor.step")
        out["profile_core"] = profile_monitor(spec, batches, 20, 0, args.seed)
        out["profile_deep"] = profile_monitor(spec, batches, 4, 1, args.seed)
    return out


def log(msg: str) -> None:
    print(f"[overhead] {msg}", file=sys.stderr, flush=True)


def render(res: dict[str, Any]) -> str:
    m = res["model"]
    lines = [
        "## gfservice monitor overhead",
        "",
        f"Model: {m['description']}: {m['parameters'] / 1e6:.1f}M parameters in {m['tensors']} tensors "
        f"(width {m['width']}, depth {m['depth']}, vocab {m['vocab']}); batch {m['batch']} x {m['seq']} tokens; "
        f"AdamW; CPU, torch {res['environment']['torch']}, {res['environment']['threads']} threads.",
    ]
    if "variants" in res:
        lines += render_rounds(res)
    lines += render_micro(res)
    return "\n".join(lines)


def render_rounds(res: dict[str, Any]) -> list[str]:
    cfg, v = res["config"], res["variants"]
    b = v["baseline"]
    lines = [
        f"Baseline step: forward+backward {b['fwd_bwd_ms']:.0f} ms, optimizer {b['optimizer_ms']:.0f} ms "
        f"(forward+backward: {100 * b['fwd_bwd_share']:.0f}% of a step, median).",
        f"{b['rounds']} rounds x {cfg['steps']} steps per variant, interleaved (order rotating), "
        f"{cfg['warmup']} warm-up steps each; {res['measure_s']:.0f} s of measurement.",
        "",
        f"Baseline step times: 20th percentile {b['p20_step_ms']:.0f} ms, median {b['median_step_ms']:.0f} ms, "
        f"80th percentile {b['p80_step_ms']:.0f} ms (a wide spread means a loaded machine: the step ratios are "
        f"then noisy, the monitor's own time much less).",
        "",
        "| variant | median step ms | step ratio, paired median (p25-p75 over rounds) | step ratio, 20th pct | "
        "monitor ms/step, median (20th pct) | 1 + monitor/baseline (20th pcts) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in VARIANTS:
        r = v[name]
        inner = "-" if name == "baseline" else f"{r['inner_ms_per_step']:.2f} ({r['inner_p20_ms']:.2f})"
        iratio = "-" if name == "baseline" else f"{r['inner_ratio']:.4f}"
        lines.append(f"| {r['label']} | {r['median_step_ms']:.1f} | {r['ratio']:.3f} "
                     f"({r['ratio_p25']:.3f}-{r['ratio_p75']:.3f}) | {r['ratio_q20']:.3f} | {inner} | {iratio} |")
    d = v["deep"]
    if "deep_steps" in d:
        lines += ["", f"Deep variant: {d['deep_steps']} deep step(s) measured, {d['deep_inner_extra_ms']:.0f} ms more "
                      f"inside the monitor than a core step (step time {d['deep_step_extra_ms']:+.0f} ms, noisier); "
                      f"the former is spread over deep_every={cfg['deep_every']} steps in the figures above."]
    elif "note" in d:
        lines += ["", f"Deep variant: {d['note']}."]
    lines += ["", "The floor's 'monitor ms/step' is the time of its one _foreach_norm pass.", "",
              "| target | step ratio (paired median) | verdict | 1 + monitor/baseline (20th pcts) | verdict |",
              "|---|---:|---|---:|---|"]
    for t in res["targets"]:
        what = "core every step" if t["variant"] == "core" else f"+ deep every {cfg['deep_every']}"
        lines.append(f"| <= {t['target']:.2f}x {what} | {t['step_ratio']:.3f} | {t['step_verdict']} | "
                     f"{t['monitor_ratio']:.4f} | {t['monitor_verdict']} |")
    for name in ("core", "deep"):
        r = v[name]
        lines.append("")
        lines.append(f"{name}: Monitor.overhead_s / steps = {r['monitor_overhead_s_per_step_raw_ms']:.2f} ms "
                     f"(all {r['steps'] + cfg['warmup']} steps, deep ones unamortized), "
                     f"errors {r['monitor_errors']}, findings {r['findings'] or 'none'}")
    return lines


def render_micro(res: dict[str, Any]) -> list[str]:
    cfg, mi = res["config"], res["micro"]
    base_ms = res.get("baseline_ms", math.nan)
    lines: list[str] = []
    ch = mi["choices_ms"]
    ref = ch["_foreach_norm(2)"]["min_ms"]
    lines += ["", f"### Collection choices on the model's real gradients ({mi['layers']} tensors, "
                  f"{mi['grad_bytes'] / 2**20:.0f} MiB), {cfg['micro_reps']} repetitions",
              "", "| computation | min ms | median ms | min vs _foreach_norm(2) | median, % of baseline step |",
              "|---|---:|---:|---:|---:|"]
    for k, t in ch.items():
        if "error" in t:
            lines.append(f"| {k} | failed: {t['error']} | | | |")
            continue
        lines.append(f"| {k} | {t['min_ms']:.2f} | {t['median_ms']:.2f} | {t['min_ms'] / ref:.2f}x | "
                     f"{100 * t['median_ms'] / base_ms:.2f}% |".replace("nan%", "-"))
    pc = mi["monitor_pieces_ms"]
    if "error" in pc:
        lines += ["", f"Inside Monitor.step: not measured ({pc['error']})."]
    else:
        keys = list(dict.fromkeys([*pc["core"], *pc["deep"]]))
        lines += ["", "### Inside Monitor.step on the same gradients (median ms per step)", "",
                  "| piece | core step | deep step |", "|---|---:|---:|"]
        for k in keys:
            c, d_ = pc["core"].get(k), pc["deep"].get(k)
            lines.append(f"| {k} | {'-' if c is None else f'{c:.3f}'} | {'-' if d_ is None else f'{d_:.3f}'} |")
        det = ", ".join(f"{k} {ms:.3f}" for k, ms in pc["detectors_ms"].items())
        lines += ["", f"Detectors inside the aggregator (ms per step): {det}."]
    compiled = ch.get("candidate: torch.compile one-pass core", {})
    if "compile_s" in compiled:
        lines += ["", f"The torch.compile candidate took {compiled['compile_s']:.1f} s to compile "
                      "(once per process and set of shapes)."]
    for key in ("profile_core", "profile_deep"):
        if key in res:
            lines += ["", f"### cProfile of Monitor.step ({key[8:]})", "", "```", res[key].strip(), "```"]
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about 1 minute instead of about 5")
    p.add_argument("--seconds", type=float, help="measurement budget (default 210, quick 30)")
    p.add_argument("--steps", type=int, default=1, help="steps per variant per round")
    p.add_argument("--min-rounds", type=int, help="rounds at least, whatever the budget (default 20, quick 5)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps per variant before the rounds")
    p.add_argument("--micro-reps", type=int, help="repetitions of each micro-benchmark (default 15, quick 5)")
    p.add_argument("--deep-every", type=int, default=50)
    p.add_argument("--batch", type=int, default=ModelSpec.batch, help="sequences of 128 tokens per step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--micro-only", action="store_true", help="skip the training rounds: micro-benchmarks only")
    p.add_argument("--profile", action="store_true", help="add a cProfile of Monitor.step (core and deep)")
    p.add_argument("--candidates", action="store_true",
                   help="also time a torch.compile'd one-pass (sum of squares, max |g|) kernel (compiles for 10-60 s)")
    p.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    a = p.parse_args(argv)
    quick = a.quick
    a.seconds = a.seconds if a.seconds is not None else (30.0 if quick else 210.0)
    a.min_rounds = a.min_rounds or (5 if quick else 20)
    a.micro_reps = a.micro_reps or (5 if quick else 15)
    if a.deep_every < 1:
        p.error("--deep-every must be positive")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(render(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2, default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
