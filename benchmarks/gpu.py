"""What ``gfservice.monitor`` costs a GPU training step: a ~350M-parameter GPT-style decoder, bf16 autocast, AdamW.

One prepared script that fits in eight minutes on one GPU (about three on an H100/H200). Three variants of the
same step (forward, backward, ``AdamW.step``, ``zero_grad``), each with its own model, optimizer and data:

- ``baseline``: nothing more;
- ``core``: ``monitor.step(loss=loss)`` of ``gfservice.monitor(model, opt, service=None, deep_every=0)``: core
  statistics every step (the fused kernel, one packed copy to pinned memory, no host sync);
- ``deep/50``: the same with ``deep_every=50``.

Rounds alternate (rotated order); each round runs ``--steps`` steps (50: one deep cycle) per variant, timed with
CUDA events around the whole round (so the GPU's own time counts, not the launch time). Reported per variant:
the step time, the step ratio against the baseline of the same round (median over rounds), and the monitor's
own CPU time per step (``Monitor.overhead_s``). Then the fused kernel alone: the core statistics of the model's
real gradients timed with CUDA events (mean of 50 calls), its bytes read per second and their fraction of the
device's peak memory bandwidth (from a table of known devices, else computed from
``torch.cuda.get_device_properties``). Targets: core step ratio <= 1.01x; the fused kernel at >= 70% of the
peak bandwidth. Prints a markdown table and writes ``gpu.json`` to ``$OUT`` (or ``--out``) when set.

Run::

    .venv/bin/python benchmarks/gpu.py                   # on a GPU: ~350M parameters, 4 rounds of 50 steps
    .venv/bin/python benchmarks/gpu.py --cpu --tiny      # a smoke run on the CPU (a tiny model, no targets)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gfservice
from gfservice.training.collect import GradCollector, _core

#: Peak memory bandwidth, bytes/s, by device-name fragment (vendor figures).
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12,
                  "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12, "L40S": 0.864e12,
                  "A10G": 0.6e12, "L4": 0.3e12}
TARGETS = {"core_step_ratio": 1.01, "bandwidth_fraction": 0.70}


@dataclass(frozen=True)
class Spec:
    vocab: int = 32768
    width: int = 1024
    depth: int = 24
    heads: int = 16
    seq: int = 1024
    batch: int = 8


TINY = Spec(vocab=256, width=64, depth=2, heads=4, seq=32, batch=2)


class Block(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(s.width), nn.LayerNorm(s.width)
        self.qkv, self.proj = nn.Linear(s.width, 3 * s.width), nn.Linear(s.width, s.width)
        self.fc, self.out = nn.Linear(s.width, 4 * s.width), nn.Linear(4 * s.width, s.width)
        self.heads = s.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, s: Spec):
        super().__init__()
        self.tok, self.pos = nn.Embedding(s.vocab, s.width), nn.Embedding(s.seq, s.width)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.depth))
        self.ln = nn.LayerNorm(s.width)
        self.head = nn.Linear(s.width, s.vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """(bytes/s, where the figure comes from) for ``device``; None on the CPU."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for frag, bw in PEAK_BANDWIDTH.items():
        if frag in name:
            return bw, f"table ({frag})"
    props = torch.cuda.get_device_properties(device)
    clock = getattr(props, "memory_clock_rate", 0)  # kHz
    bus = getattr(props, "memory_bus_width", 0)  # bits
    if clock and bus:
        return 2 * clock * 1e3 * bus / 8, "device properties"
    return None, "unknown"


class Variant:
    def __init__(self, name: str, s: Spec, device: torch.device, deep_every: int | None):
        torch.manual_seed(0)
        self.name = name
        self.model = GPT(s).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        gen = torch.Generator(device=device).manual_seed(1)
        self.x = torch.randint(0, s.vocab, (s.batch, s.seq), device=device, generator=gen)
        self.y = torch.randint(0, s.vocab, (s.batch, s.seq), device=device, generator=gen)
        self.mon = None if deep_every is None else gfservice.monitor(
            self.model, self.opt, run=f"gpu-{name.replace('/', '-')}", service=None, deep_every=deep_every)
        self.device = device
        self.step_s: list[float] = []
        self.calls = 0

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            logits = self.model(self.x)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), self.y.view(-1))
        loss.backward()
        self.opt.step()
        if self.mon is not None:
            self.mon.step(loss=loss.detach())
            self.calls += 1
        self.opt.zero_grad(set_to_none=True)

    def round(self, steps: int) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for _ in range(steps):
            self.step()
        if self.device.type == "cuda":
            end.record()
            end.synchronize()
            self.step_s.append(start.elapsed_time(end) / 1e3 / steps)
        else:
            self.step_s.append((time.perf_counter() - t0) / steps)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_alone(v: Variant, repeats: int) -> dict[str, Any]:
    """Time the core statistics of ``v``'s real gradients (all layers, one packed result) with CUDA events."""
    dev = v.device
    with torch.autocast(dev.type, dtype=torch.bfloat16):
        logits = v.model(v.x)
    F.cross_entropy(logits.float().view(-1, logits.shape[-1]), v.y.view(-1)).backward()
    coll = GradCollector(v.model.named_parameters())
    grads = [p.grad for p in coll.params if p.grad is not None]
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    for _ in range(3):
        _core(grads, dev)
    sync(dev)
    t0 = time.perf_counter()
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for _ in range(repeats):
        _core(grads, dev)
    if dev.type == "cuda":
        end.record()
        end.synchronize()
        sec = start.elapsed_time(end) / 1e3 / repeats
    else:
        sec = (time.perf_counter() - t0) / repeats
    floor_t0 = time.perf_counter()
    if dev.type == "cuda":
        start.record()
    for _ in range(repeats):
        torch._foreach_norm(grads, 2)
    if dev.type == "cuda":
        end.record()
        end.synchronize()
        floor = start.elapsed_time(end) / 1e3 / repeats
    else:
        floor = (time.perf_counter() - floor_t0) / repeats
    from gfservice.training.kernels.cuda import TRITON

    v.opt.zero_grad(set_to_none=True)
    return {"tensors": len(grads), "bytes": nbytes, "kernel_ms": sec * 1e3, "foreach_norm_ms": floor * 1e3,
            "bytes_per_s": nbytes / sec, "triton": TRITON.in_use}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (with --tiny: a smoke test)")
    ap.add_argument("--tiny", action="store_true", help="a tiny model, few steps")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 4, tiny 2)")
    ap.add_argument("--steps", type=int, default=None, help="steps per round and variant (default 50, tiny 4)")
    ap.add_argument("--out", default=os.environ.get("OUT", ""), help="directory for gpu.json (default $OUT)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1 if args.cpu else max(1, torch.get_num_threads()))
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu --tiny for a smoke test", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    spec = TINY if args.tiny else Spec()
    rounds = args.rounds or (2 if args.tiny else 4)
    steps = args.steps or (4 if args.tiny else 50)
    deep_every = steps
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    t_start = time.perf_counter()
    variants = [Variant("baseline", spec, device, None), Variant("core", spec, device, 0),
                Variant("deep/50", spec, device, deep_every)]
    n_params = sum(p.numel() for p in variants[0].model.parameters())
    n_tensors = sum(1 for _ in variants[0].model.parameters())
    for v in variants:  # warm-up: kernels, allocator, the Triton self-check and first compile
        for _ in range(3):
            v.step()
    sync(device)
    for v in variants:
        if v.mon is not None:
            v.mon.overhead_s, v.calls = 0.0, 0
    for r in range(rounds):
        k = r % len(variants)
        for v in variants[k:] + variants[:k]:
            v.round(steps)
    base = variants[0]
    rows: list[dict[str, Any]] = []
    for v in variants:
        ratios = [s / b for s, b in zip(v.step_s, base.step_s, strict=True)]
        rows.append({"variant": v.name, "step_ms": statistics.median(v.step_s) * 1e3,
                     "step_ratio": statistics.median(ratios),
                     "monitor_cpu_ms": (v.mon.overhead_s / v.calls * 1e3) if v.mon is not None and v.calls else None,
                     "errors": v.mon.errors if v.mon is not None else 0})
    kern: dict[str, Any] = kernel_alone(variants[1], 10 if args.tiny else 50)
    for v in variants:
        if v.mon is not None:
            v.mon.close()
    peak, source = peak_bandwidth(device)
    kern["peak_bytes_per_s"] = peak
    kern["peak_source"] = source
    kern["bandwidth_fraction"] = kern["bytes_per_s"] / peak if peak else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# gfservice on {name}: GPT {spec.depth}x{spec.width}, {n_params / 1e6:.1f}M parameters, {n_tensors} "
          f"tensors, batch {spec.batch}x{spec.seq}, bf16 autocast, AdamW; {rounds} rounds x {steps} steps, "
          f"deep every {deep_every}; torch {torch.__version__}\n")
    print("| variant | step, ms | step ratio | monitor CPU time, ms/step | monitor errors |")
    print("|---|---|---|---|---|")
    for row in rows:
        mon = "-" if row["monitor_cpu_ms"] is None else f"{row['monitor_cpu_ms']:.2f}"
        print(f"| {row['variant']} | {row['step_ms']:.2f} | {row['step_ratio']:.4f}x | {mon} | {row['errors']} |")
    frac = kern["bandwidth_fraction"]
    impl = 'CPU' if device.type == 'cpu' else 'Triton' if kern['triton'] else 'foreach'
    print(f"\ncore statistics alone ({impl}): {kern['kernel_ms']:.3f} ms for "
          f"{kern['bytes'] / 1e6:.0f} MB in {kern['tensors']} tensors = {kern['bytes_per_s'] / 1e9:.0f} GB/s"
          + (f", {frac:.0%} of the peak {peak / 1e9:.0f} GB/s ({source})" if frac and peak else "")
          + f"; one _foreach_norm: {kern['foreach_norm_ms']:.3f} ms")
    core = rows[1]["step_ratio"]
    checks: list[tuple[str, bool, str]] = [
        ("core step ratio <= 1.01x", core <= TARGETS["core_step_ratio"], f"{core:.4f}x")]
    if frac is not None:
        checks.append(("fused kernel >= 70% of peak bandwidth", frac >= TARGETS["bandwidth_fraction"], f"{frac:.0%}"))
    ok = all(r["errors"] == 0 for r in rows)
    for what, good, detail in checks:
        print(f"- {'met' if good else 'MISSED'}: {what} ({detail})")
        ok = ok and (good or args.tiny)
    print(f"monitor errors: {sum(r['errors'] for r in rows)}")
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu.json"), "w") as f:
            json.dump({"device": name, "spec": asdict(spec), "params": n_params, "tensors": n_tensors,
                       "rows": rows, "kernel": kern, "checks": [list(c) for c in checks],
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, f, indent=1,
                      default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
