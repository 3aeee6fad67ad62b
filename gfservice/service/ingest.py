"""One batch into the aggregator: what the Ray service and the peer server both do with what a sender submits.

Every message is submitted on its own (a bad one costs only itself), the sender's drops are counted, and the
answer is one :class:`~gfservice.wire.BatchAnswer`: the refusals by index and the stop verdict of every run the
batch names.

>>> from gfservice.service.aggregator import Aggregator
>>> lay = {"kind": "layout", "run": "doc", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [2],
...        "sharded": [False]}
>>> answer, found = take(Aggregator(), [lay, {"kind": "nope"}], {"doc": 3})
>>> answer.plain(), found
({'rejected': [[1, 'unknown_kind']], 'stop': {'doc': None}}, False)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gfservice.service.aggregator import Aggregator
from gfservice.wire import BatchAnswer, RejectReason

__all__ = ["take"]


def take(aggregator: Aggregator, messages: Sequence[Any], dropped: Mapping[str, int] | None = None,
         runs: Iterable[str] = ()) -> tuple[BatchAnswer, bool]:
    """Submit ``messages`` and note the ``dropped`` reports by run; returns the answer, with the verdicts of
    ``runs`` and of every run named by a message, and whether any message raised a new finding."""
    rejected: list[tuple[int, RejectReason]] = []
    asked = set(runs)
    found = False
    for i, msg in enumerate(messages):
        ack = aggregator.submit(msg)
        if not ack.accepted:
            rejected.append((i, ack.reason if ack.reason is not None else RejectReason.invalid))
        found = found or bool(ack.new_findings)
        if isinstance(msg, dict) and isinstance(msg.get("run"), str):
            asked.add(msg["run"])
    for run, n in (dropped or {}).items():
        aggregator.note_dropped(run, n)
    return BatchAnswer(rejected=rejected, stop={r: aggregator.should_stop(r) for r in asked}), found
