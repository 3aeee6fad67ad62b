"""The node merge: the reports of a node's ranks, held per step until every covered rank reported it (or for at
most ``wait_s``), merged exactly with :func:`~gfservice.service.merging.merge_node` and forwarded as one message.
Plain Python, no transport: the Ray merge agent (:mod:`gfservice.hosting.merge_agent`) and the torchrun/Slurm
node merger (:mod:`gfservice.hosting.node_merger`) both run one.

>>> sent = []
>>> m = NodeMerger(lambda batch: sent.extend(batch), wait_s=5.0, clock=lambda: 0.0)
>>> for r in (0, 1):
...     _ = m.submit([{"kind": "layout", "run": "r", "rank": r, "world_size": 2, "layers": ["w"], "numel": [4],
...                    "sharded": [True]}])
>>> for r in (0, 1):
...     _ = m.submit([{"kind": "step", "run": "r", "rank": r, "step": 0, "local_norm": 1.0 + r,
...                    "stats": {"count": [2], "sum_sq": [1.0], "nonfinite": [0]}}])
>>> [(d["kind"], d["rank"], d.get("ranks")) for d in sent[:2]], sent[-1]["node"]["ranks"]
([('layout', 0, [0]), ('layout', 0, [0, 1])], [0, 1])
>>> float(sent[-1]["stats"]["sum_sq"][0])
2.0
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gfservice.envelopes import BatchAnswer
from gfservice.service.merging import merge_node
from gfservice.wire import Layout, Rejected, RejectReason, RunEnd, StepReport, parse

__all__ = ["MAX_HELD", "NodeMerger"]

#: Steps of a run held at once; past it the oldest is forwarded with what it has.
MAX_HELD = 64


@dataclass(eq=False)
class _NodeRun:
    """What the agent knows of one run on its node."""

    attempt: str
    #: The node's layout (the first layout that reports layers, or else the first one) and the ranks it covers.
    layout: Layout | None = None
    covered: set[int] = field(default_factory=set)
    #: Ranks forwarded as they came (their layout differs from the node's).
    direct: set[int] = field(default_factory=set)
    held: dict[int, dict[int, StepReport]] = field(default_factory=dict)
    since: dict[int, float] = field(default_factory=dict)
    #: The newest step forwarded: a later report of it (or of an older one) goes on alone.
    forwarded: int = -1
    stop: str | None = None

    def node_layout(self) -> dict[str, Any]:
        assert self.layout is not None
        ranks = sorted(self.covered)
        return {**dict(self.layout), "rank": ranks[0], "ranks": ranks}


def _same_layout(a: Layout, b: Layout) -> bool:
    return (a.world_size, a.reports_layers, a.layers, a.numel, a.sharded, a.units, a.kinds) == (
        b.world_size, b.reports_layers, b.layers, b.numel, b.sharded, b.units, b.kinds)


class NodeMerger:
    """The agent's work, without Ray: ``submit`` takes a batch of the node's ranks, ``tick`` forwards the steps
    that waited ``wait_s``; ``forward`` gets the messages for the service (plain dicts), ``note_answer`` takes its
    answers. Thread-safe."""

    def __init__(self, forward: Callable[[list[dict[str, Any]]], None], wait_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.forward = forward
        self.wait_s = wait_s
        self.clock = clock
        self.runs: dict[str, _NodeRun] = {}
        self.lock = threading.Lock()
        #: Messages taken and steps forwarded merged (for the benchmark and status).
        self.taken = 0
        self.merged_steps = 0

    def submit(self, messages: Sequence[Any]) -> BatchAnswer:
        out: list[dict[str, Any]] = []
        rejected: list[tuple[int, RejectReason]] = []
        names: set[str] = set()
        with self.lock:
            for i, raw in enumerate(messages):
                try:
                    msg = parse(raw)
                except Rejected as exc:
                    rejected.append((i, exc.reason))
                    continue
                names.add(msg.run)
                self.taken += 1
                self._take(msg, raw, out)
            stop = {n: (self.runs[n].stop if n in self.runs else None) for n in names}
        if out:
            self.forward(out)
        return BatchAnswer(rejected=rejected, stop=stop)

    def _take(self, msg: Layout | StepReport | RunEnd, raw: Any, out: list[dict[str, Any]]) -> None:
        run = self.runs.get(msg.run)
        if run is None or (isinstance(msg, Layout) and msg.attempt != run.attempt):
            run = self.runs[msg.run] = _NodeRun(msg.attempt)
        if isinstance(msg, Layout):
            if msg.ranks or (run.layout is not None and not _same_layout(msg, run.layout)):
                run.direct.add(msg.rank)
                out.append(dict(msg))
                return
            run.layout = run.layout or msg
            run.direct.discard(msg.rank)
            run.covered.add(msg.rank)
            out.append(run.node_layout())
            return
        if isinstance(msg, RunEnd) or msg.rank not in run.covered or msg.node is not None:
            out.append(dict(msg))
            return
        if msg.step <= run.forwarded and msg.step not in run.held:  # late: its step went on without it
            out.append(dict(msg))
            return
        slot = run.held.setdefault(msg.step, {})
        if msg.rank in slot:
            return  # a duplicate: the service would refuse it
        slot[msg.rank] = msg
        run.since.setdefault(msg.step, self.clock())
        if len(slot) >= len(run.covered):
            self._send(run, msg.step, out)
        while len(run.held) > MAX_HELD:
            self._send(run, min(run.held), out)

    def _send(self, run: _NodeRun, step: int, out: list[dict[str, Any]]) -> None:
        reports = run.held.pop(step)
        run.since.pop(step, None)
        assert run.layout is not None
        out.append(merge_node(run.layout, reports))
        run.forwarded = max(run.forwarded, step)
        self.merged_steps += 1

    def stop_of(self, run: str) -> str | None:
        """The stop verdict the service last gave for ``run`` (None: go on, or not heard yet)."""
        with self.lock:
            known = self.runs.get(run)
            return known.stop if known is not None else None

    def tick(self) -> None:
        """Forward the steps that waited ``wait_s`` or more, with the reports they have."""
        out: list[dict[str, Any]] = []
        now = self.clock()
        with self.lock:
            for run in self.runs.values():
                for step in sorted(s for s, t in run.since.items() if now - t >= self.wait_s):
                    self._send(run, step, out)
        if out:
            self.forward(out)

    def drain(self) -> None:
        """Forward every held step now, with the reports it has (the node's merger is closing)."""
        out: list[dict[str, Any]] = []
        with self.lock:
            for run in self.runs.values():
                for step in sorted(run.held):
                    self._send(run, step, out)
        if out:
            self.forward(out)

    def note_answer(self, answer: BatchAnswer, resend_layouts: bool = True) -> None:
        """Take the service's answer to a forwarded batch: its verdicts, and layouts to send again (unless
        ``resend_layouts`` is False: a sender that keeps the layouts it sent sends them again itself)."""
        resend: list[dict[str, Any]] = []
        with self.lock:
            for name, reason in answer.stop.items():
                if name in self.runs:
                    self.runs[name].stop = reason
            if answer.resend_layout and resend_layouts:
                resend = [run.node_layout() for run in self.runs.values() if run.layout is not None]
        if resend:
            self.forward(resend)
