"""Node merging under torchrun or Slurm (no Ray): each node's local rank 0 merges its node's reports over
loopback and sends one message per step to global rank 0.

When a job merges on its nodes (:func:`merges_on_nodes`: the rule of the Ray merge agent, from
:data:`~gfservice.training.ray_sender.AGENT_MIN_WORLD` ranks or as ``$GFSERVICE_MERGE_AGENT`` says, and only
when this rank's node is known, :func:`node_ranks`), the node's local rank 0 runs a :class:`NodeHost`:

- a :class:`NodeServer` on ``127.0.0.1`` only: the peer server's machinery (:class:`~gfservice.service.peer_server
  .PeerListener`: non-blocking, bounded, every connection proves it holds the key made from a secret that local
  rank 0 made and shared through the job's rendezvous store, bound to ``$GFSERVICE_TOKEN`` when set), which
  takes only the node's own ranks, each speaking only for itself;
- a :class:`~gfservice.hosting.merger.NodeMerger` (the Ray agent's exact merge and bounded wait, in this
  process) fed by that server;
- for each run, a :class:`~gfservice.training.peer_sender.PeerSender` to global rank 0's peer server that
  authenticates for the node (``"node": n`` in its hello: rank 0's server lets it speak for exactly the ranks
  ``rank .. rank + n - 1``, at most as many as rank 0's own node holds, never past the world size), and carries
  the merged reports, the verdicts and the findings back.

Every rank of the node, local rank 0 included, sends to its node's server as it would to rank 0. Global rank 0
is local rank 0 of the first node: its node merges like any other and forwards over loopback to its own peer
server (one code path; the hop costs node 0 one local encode). On a single node the same holds, and the rule
keeps it off unless ``$GFSERVICE_MERGE_AGENT=1`` (one node never has 256 ranks).

Nodes are the contiguous rank blocks torchrun and Slurm's default block distribution make:
``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` (torchrun), else ``SLURM_LOCALID``/``SLURM_NTASKS_PER_NODE``.
``$GFSERVICE_NODE_SIZE`` overrides both (rank ``r`` is then on node ``r // size``): the test uses it to split
one machine's ranks into simulated nodes.

>>> node_ranks(5, 8, env={"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"})
range(4, 8)
>>> node_ranks(5, 8, env={"GFSERVICE_NODE_SIZE": "2"}), node_ranks(5, 8, env={})
(range(4, 6), None)
>>> merges_on_nodes(8, range(0, 4), env={"GFSERVICE_MERGE_AGENT": "1"}), merges_on_nodes(8, None, env={})
(True, False)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

from gfservice.api import Finding
from gfservice.envelopes import BatchAnswer
from gfservice.hosting.merger import NodeMerger
from gfservice.service.peer_server import PeerListener
from gfservice.training.peer_sender import PeerSender
from gfservice.training.ray_sender import wants_agent
from gfservice.wire import Rejected, parse

__all__ = ["NODE_SIZE_ENV", "NodeHost", "NodeServer", "merges_on_nodes", "node_ranks"]

log = logging.getLogger(__name__)

#: Ranks per node, overriding what the launcher says (simulated nodes on one machine).
NODE_SIZE_ENV = "GFSERVICE_NODE_SIZE"


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    return int(value) if value.isdigit() else None


def node_ranks(rank: int, world_size: int, env: Mapping[str, str] | None = None) -> range | None:
    """The ranks of ``rank``'s node (a contiguous block, local rank 0 first), or None when not known."""
    env = os.environ if env is None else env
    size = _int(env, NODE_SIZE_ENV)
    local = rank % size if size else None
    if not size:
        size, local = _int(env, "LOCAL_WORLD_SIZE"), _int(env, "LOCAL_RANK")
    if not size or local is None:
        size, local = _int(env, "SLURM_NTASKS_PER_NODE"), _int(env, "SLURM_LOCALID")
    if not size or local is None or local >= size or local > rank:
        return None
    first = rank - local
    return range(first, min(first + size, world_size))


def merges_on_nodes(world_size: int, node: range | None, env: Mapping[str, str] | None = None) -> bool:
    """Whether a job of ``world_size`` ranks merges on its nodes: as a Ray job would route through its merge
    agents (:func:`~gfservice.training.ray_sender.wants_agent`), when the node is known."""
    return node is not None and wants_agent(world_size, env)


class NodeServer(PeerListener):
    """Local rank 0's loopback server: what the node's ranks send goes into ``host``'s merger; the answers carry
    the merger's verdicts and the findings global rank 0 sent back."""

    def __init__(self, host: NodeHost, tick_interval_s: float, token: str | None = None):
        self._host = host
        super().__init__("127.0.0.1", 0, token, tick_interval_s)

    def _submit(self, run: str, messages: list[Any], dropped: dict[str, int] | None) -> BatchAnswer:
        if dropped:
            self._host.pass_on_drops(dropped)
        answer = self._host.merger.submit(messages)
        if run in answer.stop:
            return answer
        return answer.model_copy(update={"stop": {**answer.stop, run: self._host.merger.stop_of(run)}})  # a poll

    def _tick(self) -> None:
        self._host.merger.tick()

    def _read_findings(self, run: str) -> list[Finding]:
        upstream = self._host.upstream.get(run)
        if upstream is None:
            raise KeyError(run)
        return upstream.findings(run)


class NodeHost:
    """What a node's local rank 0 runs (see the module doc): the :class:`NodeServer`, the
    :class:`~gfservice.hosting.merger.NodeMerger`, and one upstream sender per run (:meth:`serve`).
    ``wait_s``: how long a step waits for the node's missing ranks."""

    def __init__(self, token: str | None = None, wait_s: float = 1.0, tick_interval_s: float = 0.25):
        self.upstream: dict[str, PeerSender] = {}
        self._lock = threading.Lock()
        self.merger = NodeMerger(self._forward, wait_s=wait_s)
        self.server = NodeServer(self, min(tick_interval_s, wait_s / 4), token)

    def serve(self, run: str, attempt: str, world_size: int, secret: str, node: range, upstream: PeerSender) -> None:
        """Take the ``node``'s ranks of ``attempt`` of ``run`` (those proving they hold ``secret``), and send what
        they report, merged, through ``upstream`` (a sender authenticated for the node)."""
        with self._lock:
            old, self.upstream[run] = self.upstream.get(run), upstream
        if old is not None and old is not upstream:
            old.close()
        self.server.admit(run, attempt, world_size, secret, ranks=node)

    def note_answer(self, answer: BatchAnswer) -> None:
        """An upstream sender's answer: the verdicts (the sender sends its layouts again itself)."""
        self.merger.note_answer(answer, resend_layouts=False)

    def pass_on_drops(self, dropped: Mapping[str, int]) -> None:
        for run, n in dropped.items():
            upstream = self.upstream.get(run)
            if upstream is not None:
                upstream.pass_on_drops(n)

    def _forward(self, batch: list[dict[str, Any]]) -> None:
        for plain in batch:
            upstream = self.upstream.get(plain.get("run", ""))
            if upstream is None:
                continue
            try:
                upstream.send(parse(plain))
            except Rejected:  # the merger's own output: a bug, not the node's
                log.warning("gfservice node merger: could not forward a message", exc_info=True)

    @property
    def address(self) -> str:
        return self.server.address

    def close(self) -> None:
        """Stop taking reports, forward the held steps, deliver what is queued."""
        self.server.close()
        self.merger.drain()
        for upstream in list(self.upstream.values()):
            upstream.close()
