"""The node merge agent: one Ray actor per node that the node's ranks send to, which merges their reports of a
step exactly and forwards one message per step to the service, so that the aggregator's work follows the nodes,
not the ranks.

A rank's :class:`~gfservice.training.ray_sender.RaySender` calls the agent's ``submit`` as it would call the
service's (same batches, same answers), fire and forget. The agent (:class:`NodeMerger`, plain Python):

- takes the ranks' layouts; those that agree (layers, sizes, sharding, world size) make the node's layout, sent
  on as one :class:`~gfservice.wire.Layout` whose ``ranks`` are the node's ranks (again when a rank joins); a
  rank whose layout differs (a DDP heartbeat rank, a mismatch) is forwarded as it came, and so are its reports;
- holds each step until every covered rank reported it, or for at most ``wait_s`` after its first report
  (never blocking a rank: the sender does not wait for the agent's answer), then merges it with
  :func:`~gfservice.service.merging.merge_node` (the aggregator's exact merge: sums add, maxima by max,
  histograms add) and forwards it, each rank named in its ``node`` part (non-finite flags as a list of ranks,
  local norms and step times dense up to 64 ranks, the 8 outliers beyond); a late report is forwarded alone;
- answers each batch at once with the refusals it made and the stop verdicts it last heard from the service,
  and sends its layouts again when the service says it forgot them.

A Ray sender routes through its node's agent from a world size of
:data:`~gfservice.training.ray_sender.AGENT_MIN_WORLD` ranks, or as ``$GFSERVICE_MERGE_AGENT`` says (``1``/``0``);
it starts with the first monitor on the node that routes through it (:func:`node_agent`: named per node,
``get_if_exists``, pinned with ``NodeAffinitySchedulingStrategy``, detached so that it outlives that rank) and
ends after ``idle_exit_s`` without a message.

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

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gfservice.envelopes import BatchAnswer
from gfservice.service import auth
from gfservice.service.merging import merge_node
from gfservice.wire import Layout, Rejected, RejectReason, RunEnd, StepReport, parse

__all__ = ["MergeAgent", "NodeMerger", "agent_name", "node_agent"]

log = logging.getLogger(__name__)

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


class MergeAgent:
    """The Ray actor around a :class:`NodeMerger`: ``submit`` as the service's, a thread that forwards overdue
    steps and reads the service's answers. Made by :func:`node_agent`."""

    def __init__(self, service: Any, token: str | None = None, wait_s: float = 1.0, idle_exit_s: float = 600.0,
                 max_in_flight: int = 4):
        self._service = service
        self._auth = {"token": token} if token is not None else {}
        self._guard = auth.Guard(auth.digest(token) if token is not None else None)
        self._in_flight: list[Any] = []
        self._max_in_flight = max_in_flight
        self._flight = threading.Lock()
        self._merger = NodeMerger(self._forward, wait_s)
        self._last = time.monotonic()
        self._idle_exit_s = idle_exit_s
        threading.Thread(target=self._loop, name="gfservice-merge-agent", daemon=True).start()

    def submit(self, messages: list[Any], dropped: dict[str, int] | None = None,
               token: str | None = None) -> dict[str, Any]:
        if not self._guard.allows(token):
            n = len(messages) if isinstance(messages, list | tuple) else 1
            return BatchAnswer(rejected=[(i, RejectReason.unauthorized) for i in range(n)]).plain()
        self._last = time.monotonic()
        if dropped:  # the ranks' own drops go straight on
            self._service.submit.remote([], dropped, **self._auth)
        return self._merger.submit(messages if isinstance(messages, list | tuple) else [messages]).plain()

    def stats(self) -> dict[str, int]:
        """Messages taken and merged steps forwarded."""
        return {"taken": self._merger.taken, "merged_steps": self._merger.merged_steps}

    def ping(self) -> str:
        return "ok"

    def _forward(self, batch: list[dict[str, Any]]) -> None:
        ref = self._service.submit.remote(batch, None, **self._auth)
        with self._flight:
            self._in_flight.append(ref)
        if len(self._in_flight) > self._max_in_flight:
            self._harvest(block=True)

    def _harvest(self, block: bool) -> None:
        import ray

        with self._flight:
            refs = list(self._in_flight)
        if not refs:
            return
        ready, _ = ray.wait(refs, num_returns=1 if block else len(refs), timeout=5.0 if block else 0)
        with self._flight:
            self._in_flight = [r for r in self._in_flight if r not in ready]
        for ref in ready:
            try:
                self._merger.note_answer(BatchAnswer.model_validate(ray.get(ref)))
            except Exception:  # the service was away: those steps are lost, as a direct sender's would be
                log.debug("gfservice merge agent: forwarded batch lost", exc_info=True)

    def _loop(self) -> None:
        import ray

        period = max(0.01, self._merger.wait_s / 4)
        while True:
            time.sleep(period)
            try:
                self._merger.tick()
                self._harvest(block=False)
            except Exception:
                log.warning("gfservice merge agent: tick failed", exc_info=True)
            if time.monotonic() - self._last > self._idle_exit_s:
                ray.kill(ray.get_runtime_context().current_actor)
                return


def agent_name(node_id: str) -> str:
    """The agent's actor name on the node ``node_id``."""
    return f"gfservice-merge-{node_id}"


def node_agent(service: Any, token: str | None = None, namespace: str | None = None, wait_s: float = 1.0) -> Any:
    """The merge agent of this process's node, started when it is not there yet (the first caller on the node
    starts it; the others get it by name)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    actor = ray.remote(MergeAgent).options(
        name=agent_name(node), namespace=namespace, get_if_exists=True, lifetime="detached", num_cpus=0,
        max_concurrency=4, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    return actor.remote(service, token, wait_s)
