"""gfservice side by side with the gradient-monitoring tools people use today, on the same workloads, in one run.

Two CPU workloads, AdamW, random data: a 20M-parameter MLP (12 ``Linear(1290, 1290)``, 24 tensors) and a
2M-parameter transformer (25 ``TransformerEncoderLayer`` of width 80, 303 tensors). Every tool gets its own copy
of the model, optimizer and data (same seeds). After ``optimizer.step()`` and before ``zero_grad()`` each runs:

=============  ===================================================================================================
baseline       nothing
floor          ``torch._foreach_norm(grads)``: one read of the gradients, the least a monitor can cost
item loop      ``[p.grad.norm().item() for p in params]``, the loop people write
lightning      ``lightning.pytorch.utilities.grad_norm(model, 2)``
wandb/1        ``wandb.watch(model, log="gradients", log_freq=1)`` and ``wandb.log`` (offline mode)
wandb/100      the same, ``log_freq=100``
tb/1           TensorBoard ``SummaryWriter.add_histogram`` of every gradient, every step
tb/100         the same, every 100 steps
gf core        ``gfservice.monitor(model, opt, service=None, deep_every=0).step(loss=loss)``: in-process
gf deep/50     the same with ``deep_every=50`` (deep statistics and update norms every 50th step)
gf enqueue     core statistics with a transport that only queues the messages: the training-thread time with
               a service attached (the Ray sender's work happens on its own thread)
=============  ===================================================================================================

Rounds alternate: in each round every tool runs ``--steps`` steps (50: one deep cycle), in a rotated order,
so that machine noise hits all alike. Per tool and round: the monitoring call (time inside the tool's call,
``perf_counter`` around it; for gfservice, which reads the gradients at the end of backward, all the time it
spent in its hooks and calls, ``monitor.overhead_s``; for wandb, whose work runs in backward hooks, the step
time minus the baseline step of the same round) and the step time. Reported: medians over rounds of the call in
ms per step, the call against the floor of the same round, and the step ratio against the baseline of the same
round. The monitoring call is far steadier than step ratios on a shared machine.

Targets (exit status 1 when missed, except with ``--quick``): gf core call <= 1.3x the floor and below every
peer that looks every step (item loop, lightning, wandb/1, tb/1); gf deep/50 amortised step ratio
``1 + mean call / baseline step`` <= 1.05 (keep rounds x steps a multiple of 50); gf enqueue call <= 1.2x the
floor.

Run::

    .venv/bin/python benchmarks/peers.py              # a few minutes on 2 quiet cores
    .venv/bin/python benchmarks/peers.py --quick      # small models, a few steps: a smoke test
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import gfservice
from gfservice.api import Finding, StepStats
from gfservice.training.monitoring import Monitor, MonitorOptions
from gfservice.training.transport import TransportBase
from gfservice.wire import Layout, RunEnd, StepReport

#: The peers that look at the gradients every step, as gf core does: the bar of "below every peer".
PEERS = ("item loop", "lightning", "wandb/1", "tb/1")
HOOKED = ("wandb/1", "wandb/100")  # their work runs inside backward: call time = step - baseline step


class EnqueueTransport(TransportBase):
    """A transport that only queues the messages: what a monitor with a service attached leaves on the
    training thread (the service's sender ships them from its own thread)."""

    def __init__(self) -> None:
        self.queue: deque[Layout | StepReport | RunEnd] = deque(maxlen=1024)
        self.dropped = 0

    def send(self, message: Layout | StepReport | RunEnd) -> None:
        self.queue.append(message)

    def findings(self, run: str) -> list[Finding]:
        return []

    def stop_reason(self, run: str) -> str | None:
        return None

    def latest(self, run: str) -> StepStats | None:
        return None

    def close(self) -> None:
        self.queue.clear()


def mlp(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class Transformer(nn.Module):
    def __init__(self, vocab: int, width: int, depth: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(width, 4, 4 * width, dropout=0.0, batch_first=True, norm_first=True), depth,
            enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(tokens)))


@dataclass
class Workload:
    name: str
    make: Callable[[], nn.Module]
    data: Callable[[torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def workloads(quick: bool) -> list[Workload]:
    w, d = (256, 4) if quick else (1290, 12)
    vocab, tw, td, seq, batch = (200, 32, 3, 16, 4) if quick else (1000, 80, 25, 64, 8)
    return [
        Workload(f"MLP {w}x{d}", lambda: mlp(w, d),
                 lambda g: (torch.randn(32, w, generator=g), torch.randn(32, w, generator=g)),
                 lambda out, y: nn.functional.mse_loss(out, y)),
        Workload(f"transformer {tw}x{td}", lambda: Transformer(vocab, tw, td),
                 lambda g: (torch.randint(0, vocab, (batch, seq), generator=g),
                            torch.randint(0, vocab, (batch, seq), generator=g)),
                 lambda out, y: nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))),
    ]


@dataclass
class Tool:
    """One tool's model, optimizer, data and monitoring call; its per-round samples."""

    name: str
    model: nn.Module
    opt: torch.optim.Optimizer
    batch: tuple[torch.Tensor, torch.Tensor]
    call: Callable[[torch.Tensor, int], None]
    close: Callable[[], None] = lambda: None
    monitor: Monitor | None = None
    calls: list[float] = field(default_factory=list)  # per round: mean call time, s
    steps: list[float] = field(default_factory=list)  # per round: median step time, s


def make_tools(wl: Workload, names: list[str], deep_every: int, tmp: str, wandb_run) -> list[Tool]:
    tools: list[Tool] = []
    for name in names:
        torch.manual_seed(0)
        model = wl.make()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = wl.data(torch.Generator().manual_seed(1))
        params = [p for p in model.parameters() if p.requires_grad]
        close: Callable[[], None] = lambda: None  # noqa: E731
        call: Callable[[torch.Tensor, int], None]
        if name == "baseline":
            def call(loss, i):
                pass
        elif name == "floor":
            def call(loss, i, params=params):
                torch._foreach_norm([p.grad for p in params if p.grad is not None], 2)
        elif name == "item loop":
            def call(loss, i, params=params):
                [p.grad.norm().item() for p in params if p.grad is not None]
        elif name == "lightning":
            from lightning.pytorch.utilities import grad_norm

            def call(loss, i, model=model):
                grad_norm(model, 2)
        elif name.startswith("wandb/"):
            freq = int(name.split("/")[1])
            wandb_run.watch(model, log="gradients", log_freq=freq, idx=len(tools))

            def call(loss, i, run=wandb_run):
                run.log({"loss": float(loss)})
        elif name.startswith("tb/"):
            from torch.utils.tensorboard import SummaryWriter

            freq = int(name.split("/")[1])
            writer = SummaryWriter(os.path.join(tmp, name.replace("/", "_")))
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

            def call(loss, i, writer=writer, named=named, freq=freq):
                if i % freq == 0:
                    for n, p in named:
                        if p.grad is not None:
                            writer.add_histogram(n, p.grad, i)
            close = writer.close
        elif name in ("gf core", "gf deep/50"):
            mon = gfservice.monitor(model, opt, run="peers-" + name.replace(" ", "-").replace("/", "-"), service=None,
                                    deep_every=deep_every if name == "gf deep/50" else 0)

            def call(loss, i, mon=mon):
                mon.step(loss=loss)
            close = mon.close
        elif name == "gf enqueue":
            mon = Monitor(model, opt, EnqueueTransport(), MonitorOptions(run="peers-enqueue", deep_every=0))

            def call(loss, i, mon=mon):
                mon.step(loss=loss)
            close = mon.close
        else:
            raise ValueError(name)
        tools.append(Tool(name, model, opt, batch, call, close, mon if name.startswith("gf ") else None))
    return tools


def run_steps(tool: Tool, wl: Workload, n: int, first: int) -> tuple[float, float]:
    """``n`` training steps; (mean monitoring-call time, median step time), seconds."""
    calls, steps = [], []
    x, y = tool.batch
    mon = tool.monitor
    for i in range(first, first + n):
        before = mon.overhead_s if mon is not None else 0.0
        t0 = time.perf_counter()
        loss = wl.loss(tool.model(x), y)
        loss.backward()
        tool.opt.step()
        t1 = time.perf_counter()
        tool.call(loss.detach(), i)
        t2 = time.perf_counter()
        tool.opt.zero_grad()
        steps.append(time.perf_counter() - t0)
        # gfservice reads the gradients at the end of backward (before any clipping), in an autograd hook: its
        # call is all the time it spent in its own hooks and calls this step (monitor.overhead_s), not only
        # monitor.step()
        calls.append(mon.overhead_s - before if mon is not None else t2 - t1)
    return sum(calls) / n, statistics.median(steps)


def measure(wl: Workload, names: list[str], rounds: int, steps: int, deep_every: int, tmp: str, wandb_run) -> dict:
    tools = make_tools(wl, names, deep_every, tmp, wandb_run)
    for t in tools:  # warm-up: allocator, first-call costs, the first (deep) step of each monitor
        run_steps(t, wl, 2, 0)
    done = 2
    for r in range(rounds):
        k = r % len(tools)
        for t in tools[k:] + tools[:k]:
            c, s = run_steps(t, wl, steps, done)
            t.calls.append(c)
            t.steps.append(s)
        done += steps
    errors = sum(t.monitor.errors for t in tools if t.monitor is not None)
    for t in tools:
        t.close()
    by = {t.name: t for t in tools}
    base, floor = by["baseline"], by["floor"]
    rows = {}
    for t in tools:
        call = [(s - b) if t.name in HOOKED else c for c, s, b in zip(t.calls, t.steps, base.steps, strict=True)]
        rows[t.name] = {
            "call_ms": statistics.median(call) * 1e3,
            "call_vs_floor": statistics.median(c / f for c, f in zip(call, floor.calls, strict=True)),
            "step_ratio": statistics.median(s / b for s, b in zip(t.steps, base.steps, strict=True)),
            # over all rounds (a whole number of deep cycles when rounds x steps is a multiple of deep_every)
            "amortised": 1 + statistics.fmean(call) / statistics.median(base.steps),
            "baseline_step_ms": statistics.median(base.steps) * 1e3,
        }
    rows["baseline"]["monitor_errors"] = errors
    return rows


def table(wl_name: str, n_params: int, n_tensors: int, rows: dict) -> str:
    lines = [f"**{wl_name}** ({n_params / 1e6:.1f}M parameters, {n_tensors} tensors; baseline step "
             f"{rows['baseline']['baseline_step_ms']:.1f} ms)", "",
             "| tool | monitoring call, ms/step | call / floor | step ratio | 1 + call / baseline step |",
             "|---|---|---|---|---|"]
    for name, r in rows.items():
        hooked = "~" if name in HOOKED else ""
        lines.append(f"| {name} | {hooked}{r['call_ms']:.2f} | {r['call_vs_floor']:.2f}x | {r['step_ratio']:.2f}x "
                     f"| {r['amortised']:.3f}x |")
    return "\n".join(lines)


def verdicts(rows: dict) -> list[tuple[str, bool, str]]:
    core = rows["gf core"]
    peers = [p for p in PEERS if p in rows]
    below = all(core["call_ms"] < rows[p]["call_ms"] for p in peers)
    out = [("gf core call <= 1.3x floor", core["call_vs_floor"] <= 1.3, f"{core['call_vs_floor']:.2f}x"),
           ("gf core call below every peer", below,
            ", ".join(f"{p} {rows[p]['call_ms']:.2f}" for p in peers) + f" vs {core['call_ms']:.2f} ms")]
    if "gf deep/50" in rows:
        d = rows["gf deep/50"]["amortised"]
        out.append(("gf deep/50 amortised step ratio <= 1.05", d <= 1.05, f"{d:.3f}x"))
    if "gf enqueue" in rows:
        e = rows["gf enqueue"]["call_vs_floor"]
        out.append(("gf enqueue call <= 1.2x floor", e <= 1.2, f"{e:.2f}x"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small models, few steps: a smoke test")
    ap.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5, quick 2)")
    ap.add_argument("--steps", type=int, default=None, help="steps per tool and round (default 50, quick 4)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tools", default="", help="comma-separated subset of the tools (baseline, floor always run)")
    ap.add_argument("--workload", choices=("mlp", "transformer", "both"), default="both")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 5)
    steps = args.steps or (4 if args.quick else 50)
    deep_every = 4 if args.quick else 50
    names = ["baseline", "floor", "item loop", "lightning", "wandb/1", "wandb/100", "tb/1", "tb/100",
             "gf core", "gf deep/50", "gf enqueue"]
    if args.tools:
        keep = {s.strip() for s in args.tools.split(",")}
        names = [n for n in names if n in keep or n in ("baseline", "floor")]
    logging.getLogger("gfservice").setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        wandb_run = None
        if any(n.startswith("wandb/") for n in names):
            import wandb

            wandb_run = wandb.init(project="gfservice-peers", dir=tmp, mode="offline")
        print(f"# gfservice vs peers: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch "
              f"{torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, load average "
              f"{os.getloadavg()[0]:.1f}; {rounds} rounds x {steps} steps; deep every {deep_every}\n")
        for wl in workloads(args.quick):
            if args.workload != "both" and not wl.name.lower().startswith(args.workload):
                continue
            m = wl.make()
            n_params = sum(p.numel() for p in m.parameters())
            n_tensors = sum(1 for _ in m.parameters())
            rows = measure(wl, names, rounds, steps, deep_every, tmp, wandb_run)
            print(table(wl.name, n_params, n_tensors, rows) + "\n")
            print(f"monitor errors: {rows['baseline']['monitor_errors']}")
            if "gf core" in rows:
                for what, good, detail in verdicts(rows):
                    print(f"- {'met' if good else 'MISSED'}: {what} ({detail})")
                    ok = ok and good
            print()
        if wandb_run is not None:
            wandb_run.finish()
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
