"""The envelopes around the wire's messages: what a sender submits in one call (:class:`Batch`), the one
answer it hears back on the Ray and the peer paths alike (:class:`BatchAnswer`), and what the service says of
itself (:class:`ServiceStatus`, :class:`SnapshotHealth`). The messages inside are :mod:`gfservice.wire`'s.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gfservice.api import Finding
from gfservice.wire import RejectReason

__all__ = ["RESEND_LAYOUT", "Batch", "BatchAnswer", "ServiceStatus", "SnapshotHealth"]

#: Rejections that mean "the aggregator does not know this rank (any more)" (a restart without snapshot, a new
#: rank 0): the sender sends its layouts again.
RESEND_LAYOUT: frozenset[RejectReason] = frozenset({RejectReason.unknown_run, RejectReason.unknown_rank})


class Batch(BaseModel):
    """What a sender submits in one call: messages of its ``run`` (each one validated on its own by :func:`parse`,
    so that a bad message costs only itself) and how many reports it ``dropped`` since its last batch. An empty
    batch is a poll: it brings the run's verdict to a rank that has nothing to send.

    >>> Batch.model_validate({"run": "exp-1", "messages": [{"kind": "step"}], "dropped": 2}).dropped
    2
    >>> Batch.model_validate({"run": "exp-1", "dropped": "2"})
    Traceback (most recent call last):
    ...
    pydantic_core._pydantic_core.ValidationError: 1 validation error for Batch
    ...
    """

    model_config = ConfigDict(frozen=True, strict=True)

    run: str
    messages: list[Any] = Field(default_factory=list)
    dropped: int = 0

    def dropped_by_run(self) -> dict[str, int] | None:
        """The drops as the Ray service's ``submit`` takes them (``None`` when there are none)."""
        return {self.run: self.dropped} if self.dropped else None


class BatchAnswer(BaseModel):
    """The answer to a :class:`Batch`, the same on the Ray and the peer paths: the messages refused (their index
    in the batch, and why), the stop verdict of each run of the batch (a reason, or ``None`` to go on), and on the
    peer path the run's findings whenever they changed since the connection last heard them.

    >>> answer = BatchAnswer.model_validate({"rejected": [[0, "unknown_run"]], "stop": {"exp-1": None}})
    >>> answer.resend_layout, answer.stop_reason("exp-1"), answer.findings
    (True, None, None)
    >>> answer.plain()
    {'rejected': [[0, 'unknown_run']], 'stop': {'exp-1': None}}
    """

    model_config = ConfigDict(frozen=True)

    rejected: list[tuple[int, RejectReason]] = Field(default_factory=list)
    stop: dict[str, str | None] = Field(default_factory=dict)
    findings: list[Finding] | None = None

    def stop_reason(self, run: str) -> str | None:
        return self.stop.get(run)

    @property
    def resend_layout(self) -> bool:
        """Whether a rejection says the aggregator forgot the sender (see :data:`RESEND_LAYOUT`)."""
        return any(reason in RESEND_LAYOUT for _, reason in self.rejected)

    def plain(self) -> dict[str, Any]:
        """As plain JSON-able data, what travels (any version of the other side reads it)."""
        return self.model_dump(mode="json", exclude_none=True)


class SnapshotHealth(BaseModel):
    """What the service says about its snapshots (exported as ``gradflow_snapshot_*``)."""

    model_config = ConfigDict(frozen=True)

    #: When the last snapshot was written (Unix time); ``None`` until the first one.
    last_success: float | None = None
    #: Snapshot writes that failed, all time.
    failures: float = 0.0


class ServiceStatus(BaseModel):
    """What ``status()`` of the service answers (``gfservice status`` prints it).

    >>> ServiceStatus(version="0", pid=1, uptime_s=2.0, restored_runs=0, snapshot=SnapshotHealth(), metrics=None,
    ...               counters={}, runs=[]).model_dump()["snapshot"]
    {'last_success': None, 'failures': 0.0}
    """

    model_config = ConfigDict(frozen=True)

    version: str
    pid: int
    uptime_s: float
    #: Runs restored from the snapshot when the service started.
    restored_runs: int
    snapshot: SnapshotHealth
    #: ``host:port`` of ``/metrics``, or ``None`` when the service serves none.
    metrics: str | None
    #: The aggregator's ingest counters (accepted, rejected by reason...).
    counters: dict[str, Any]
    #: One row per run, with its active findings under ``active``.
    runs: list[dict[str, Any]]
    #: ``token`` when callers must present the service token, else ``none``.
    auth: Literal["token", "none"] = "none"


