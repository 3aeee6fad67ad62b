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

>>> NodeMerger.__module__     # the merge itself, without Ray
'gfservice.hosting.merger'
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from gfservice.envelopes import BatchAnswer
from gfservice.hosting.merger import MAX_HELD, NodeMerger
from gfservice.service import auth
from gfservice.wire import RejectReason

__all__ = ["MAX_HELD", "MergeAgent", "NodeMerger", "agent_name", "node_agent"]

log = logging.getLogger(__name__)

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
