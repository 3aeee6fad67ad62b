"""Bytes the aggregator holds per run, accounted as they change, and which runs to evict when over budget.

Nothing here walks objects: each merged step, waiting report, layout and finding record is sized once, from
its numpy arrays' ``nbytes`` plus a measured per-object overhead, when it enters one of a run's containers
(:class:`StepHistory` and :class:`RecordLog`, both a :class:`BoundedLog`; :class:`PendingSteps`,
:class:`Layouts`), and the same amount is taken off when it leaves. Detector state is an estimate from the
number of detectors and layers. Every :class:`RunMemory` feeds one :class:`Ledger`, the service-wide total,
until it is detached (its run evicted).

>>> ledger = Ledger()
>>> run = RunMemory(ledger, detectors=0)
>>> history = StepHistory(run, maxlen=2)
>>> from gfservice.testing import make_step
>>> for i in range(3):
...     history.append(make_step(step=i, sum_sq=[1.0] * 1000))
>>> run.history == 2 * step_bytes(history[0]), ledger.total == run.total
(True, True)
>>> run.detach(); ledger.total
0

Eviction order (:func:`eviction_order`): finished runs first, then idle ones, then live runs without active
findings, and live runs with active findings (or a stop verdict) last; within each group the least recently
active run goes first, but among runs with findings one with fewer merged steps goes before an older one.

>>> now = 1000.0
>>> runs = [Standing("real", False, 999.0, active=1, stopping=True, steps=500),
...         Standing("junk", False, 999.5, active=0, stopping=False, steps=1),
...         Standing("done", True, 10.0, active=1, stopping=False, steps=90)]
>>> [s.name for s in eviction_order(runs, now, idle_after_s=600)]
['done', 'junk', 'real']
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Generic, Literal, NamedTuple, Protocol, TypeVar

from gfservice.api import Finding, StepStats
from gfservice.wire import Layout, StepReport

__all__ = [
    "BoundedLog",
    "Layouts",
    "Ledger",
    "PendingSteps",
    "RecordLog",
    "RunMemory",
    "Standing",
    "StepHistory",
    "detector_bytes",
    "eviction_order",
    "layout_bytes",
    "record_bytes",
    "report_bytes",
    "step_bytes",
]

# Overheads of the Python objects around the arrays, measured with tracemalloc (CPython 3.11, pydantic 2):
#: a merged StepStats and its GradStats, less their arrays (the layer names are the run's, shared)
STEP_OVERHEAD = 1024
#: a validated StepReport and its dict of arrays, less the arrays
REPORT_OVERHEAD = 2048
#: a Layout, less its per-layer lists; and per layer: 4 list slots, 2 int objects, a str object header
LAYOUT_OVERHEAD = 4096
LAYOUT_PER_LAYER = 145
#: a finding record (the record, its Finding), less its message and layer list
RECORD_OVERHEAD = 2048
#: a run's own objects (dicts, deques, locks, its published view), and each detector object (config, fields)
RUN_OVERHEAD = 8192
DETECTOR_OVERHEAD = 1536
#: detector state per layer (EMA baselines, windows), all of a run's detectors together
DETECTOR_PER_LAYER = 64
#: a rank number in ``StepStats.missing_ranks``: its tuple slot and (above 256) its int object
MISSING_RANK = 40


T = TypeVar("T")
#: The accounted parts of a run's bytes (the attributes of :class:`RunMemory`).
Part = Literal["base", "layouts", "history", "pending", "findings", "detectors"]


class Recorded(Protocol):
    """A finding record as :func:`record_bytes` sizes it."""

    @property
    def raised(self) -> Finding: ...


R = TypeVar("R", bound=Recorded)


def step_bytes(s: StepStats) -> int:
    """Bytes one merged step holds: its arrays (per layer and per rank) and its objects."""
    n = STEP_OVERHEAD + MISSING_RANK * len(s.missing_ranks)
    for a in (*s.grads.arrays().values(), s.rank_norm, s.rank_nonfinite, s.step_time, s.compute_time, s.ranks):
        if a is not None:
            n += a.nbytes
    return n


def report_bytes(r: StepReport) -> int:
    """Bytes one waiting report holds."""
    return REPORT_OVERHEAD + sum(a.nbytes for a in r.stats.values())


def layout_bytes(lay: Layout, rank: int | None = None) -> int:
    """Bytes one rank's layout holds (its layer names and per-layer lists); a dict slot for ``rank`` when that is
    another rank of a node layout (one object for the node's ranks, counted once, under its own rank)."""
    if rank is not None and rank != lay.rank:
        return MISSING_RANK
    return LAYOUT_OVERHEAD + len(lay.layers) * LAYOUT_PER_LAYER + sum(map(len, lay.layers))


def record_bytes(rec: Recorded) -> int:
    """Bytes one finding record holds (``rec.raised`` is its :class:`~gfservice.api.Finding`)."""
    f = rec.raised
    return RECORD_OVERHEAD + len(f.message) + 8 * len(f.layers or ())


def detector_bytes(detectors: int, layers: int) -> int:
    """Estimated bytes of ``detectors`` detectors watching ``layers`` layers."""
    return detectors * DETECTOR_OVERHEAD + layers * DETECTOR_PER_LAYER


class Ledger:
    """The service-wide total of every attached :class:`RunMemory`; thread-safe (its lock is a leaf)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.total = 0


class RunMemory:
    """Bytes one run holds, by part; every change goes to the :class:`Ledger` too while attached."""

    def __init__(self, ledger: Ledger, detectors: int, created: float = 0.0):
        self.ledger = ledger
        self.attached = True
        #: When the run was created, and first seen finished (the time to live runs from then): monotonic times.
        self.created = created
        self.finished_at: float | None = None
        self.base = 0
        self.layouts = 0
        self.history = 0
        self.pending = 0
        self.findings = 0
        self.detectors = 0
        self.n_detectors = detectors
        self.add("base", RUN_OVERHEAD)
        self.set("detectors", detector_bytes(detectors, 0))

    @property
    def total(self) -> int:
        return self.base + self.layouts + self.history + self.pending + self.findings + self.detectors

    def add(self, part: Part, delta: int) -> None:
        with self.ledger.lock:
            setattr(self, part, getattr(self, part) + delta)
            if self.attached:
                self.ledger.total += delta

    def set(self, part: Part, value: int) -> None:
        self.add(part, value - getattr(self, part))

    def detach(self) -> None:
        """Take this run off the ledger (it was evicted); later changes to it no longer count."""
        with self.ledger.lock:
            if self.attached:
                self.attached = False
                self.ledger.total -= self.total


class BoundedLog(Generic[T]):
    """A bounded, oldest-first log of items that knows its bytes: one part of a :class:`RunMemory`.

    Not a ``deque`` subclass: every way in or out goes through :meth:`append` (dropping the oldest item past
    ``maxlen``), :meth:`popleft` or :meth:`clear`, so nothing can bypass the accounting. Reads are those of a
    sequence: ``len``, iteration (also reversed), indexing, truth.

    >>> mem = RunMemory(Ledger(), detectors=0)
    >>> names = BoundedLog(mem, "findings", len, maxlen=2)
    >>> names.extend(["ab", "cde", "f"])
    >>> list(names), mem.findings, names[-1]
    (['cde', 'f'], 4, 'f')
    >>> names.popleft(), mem.findings
    ('cde', 1)
    """

    __slots__ = ("_items", "_part", "_size", "memory")

    def __init__(self, memory: RunMemory, part: Part, size: Callable[[T], int], maxlen: int):
        self._items: deque[T] = deque(maxlen=maxlen)
        self._part = part
        self._size = size
        self.memory = memory

    @property
    def maxlen(self) -> int | None:
        return self._items.maxlen

    def append(self, item: T) -> None:
        delta = self._size(item)
        if self._items.maxlen is not None and 0 < self._items.maxlen == len(self._items):
            delta -= self._size(self._items[0])
        self._items.append(item)
        self.memory.add(self._part, delta)

    def extend(self, items: Iterable[T]) -> None:
        for item in items:
            self.append(item)

    def popleft(self) -> T:
        item = self._items.popleft()
        self.memory.add(self._part, -self._size(item))
        return item

    def clear(self) -> None:
        self._items.clear()
        self.memory.set(self._part, 0)

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self._items)

    def __reversed__(self) -> Iterator[T]:
        return reversed(self._items)

    def __getitem__(self, i: int) -> T:
        return self._items[i]

    def __bool__(self) -> bool:
        return bool(self._items)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self._items)!r}, maxlen={self._items.maxlen})"


class StepHistory(BoundedLog[StepStats]):
    """A run's bounded history of merged steps (``RunMemory.history``)."""

    __slots__ = ()

    def __init__(self, memory: RunMemory, maxlen: int):
        super().__init__(memory, "history", step_bytes, maxlen)


class RecordLog(BoundedLog[R]):
    """A run's bounded log of finding records (``RunMemory.findings``; a record's ``raised`` is its finding)."""

    __slots__ = ()

    def __init__(self, memory: RunMemory, maxlen: int):
        super().__init__(memory, "findings", record_bytes, maxlen)


class _Slot(dict[int, StepReport]):
    """The reports of one waiting step, by rank."""

    def __init__(self, memory: RunMemory):
        super().__init__()
        self.memory = memory
        self.nbytes = 0

    def __setitem__(self, rank: int, rep: StepReport) -> None:
        old = self.get(rank)
        delta = report_bytes(rep) - (report_bytes(old) if old is not None else 0)
        super().__setitem__(rank, rep)
        self.nbytes += delta
        self.memory.add("pending", delta)


class PendingSteps(dict[int, dict[int, StepReport]]):
    """A run's steps waiting for ranks (step -> rank -> report) that knows their bytes (``RunMemory.pending``).

    Slots come from ``setdefault(step, {})`` (the ``{}`` is replaced by an accounted slot).
    """

    def __init__(self, memory: RunMemory):
        super().__init__()
        self.memory = memory

    def setdefault(self, step: int, default: Any = None) -> dict[int, StepReport]:
        slot = self.get(step)
        if slot is None:
            slot = _Slot(self.memory)
            for rank, rep in (default or {}).items():
                slot[rank] = rep
            super().__setitem__(step, slot)
        return slot

    def pop(self, step: int, *default: Any) -> Any:
        slot = super().pop(step, *default)
        if isinstance(slot, _Slot):
            self.memory.add("pending", -slot.nbytes)
        return slot

    def __delitem__(self, step: int) -> None:
        self.pop(step)

    def clear(self) -> None:
        super().clear()
        self.memory.set("pending", 0)


class Layouts(dict[int, Layout]):
    """A run's layouts by rank that know their bytes (``RunMemory.layouts``); a layout with layers also sets
    the estimate of the run's detector state."""

    def __init__(self, memory: RunMemory):
        super().__init__()
        self.memory = memory

    def __setitem__(self, rank: int, lay: Layout) -> None:
        old = self.get(rank)
        super().__setitem__(rank, lay)
        self.memory.add("layouts", layout_bytes(lay, rank) - (layout_bytes(old, rank) if old is not None else 0))
        if lay.reports_layers:
            self.memory.set("detectors", detector_bytes(self.memory.n_detectors, len(lay.layers)))

    def pop(self, rank: int, *default: Any) -> Any:
        lay = super().pop(rank, *default)
        if isinstance(lay, Layout):
            self.memory.add("layouts", -layout_bytes(lay, rank))
        return lay

    def __delitem__(self, rank: int) -> None:
        self.pop(rank)

    def clear(self) -> None:
        super().clear()
        self.memory.set("layouts", 0)


# ---- eviction -------------------------------------------------------------------------------------
class Standing(NamedTuple):
    """What eviction weighs of one run (a tuple: a choice weighs every run)."""

    name: str
    finished: bool
    #: When it last sent anything (a monotonic time, like ``now``).
    last_seen: float
    #: Active findings.
    active: int = 0
    #: Whether a detector asked the job to stop (the verdict must outlive a flood of other runs).
    stopping: bool = False
    #: Merged steps held (its history).
    steps: int = 0
    nbytes: int = 0
    #: When the run was created (a monotonic time): a run that sent nothing since is idle from then on.
    created: float = 0.0

    def group(self, now: float, idle_after_s: float) -> int:
        """0 finished, 1 idle, 2 live without active findings, 3 live with active findings or a stop verdict."""
        if self.finished:
            return 0
        if now - max(self.last_seen, self.created) > idle_after_s:
            return 1
        return 3 if self.active or self.stopping else 2

    def rank(self, now: float, idle_after_s: float) -> tuple[int, bool, int, float]:
        """The sort key of :func:`eviction_order`."""
        group = self.group(now, idle_after_s)
        # among runs with findings, a run with more merged steps outranks a newer one, so that a flood of
        # runs that raise findings of their own cannot push out an established one
        return group, self.stopping, self.steps if group == 3 else 0, max(self.last_seen, self.created)


def eviction_order(runs: Sequence[Standing], now: float, idle_after_s: float) -> list[Standing]:
    """``runs`` in the order they are evicted (first evicted first)."""
    return sorted(runs, key=lambda s: s.rank(now, idle_after_s))


def victims(runs: Sequence[Standing], now: float, idle_after_s: float, count: int = 0, free_bytes: int = 0,
            keep_one: bool = True) -> list[Standing]:
    """The runs to evict, in order: at least ``count`` of them, and enough to free ``free_bytes``. With
    ``keep_one`` the last run standing is never chosen for bytes (a single run over budget is kept).

    >>> rs = [Standing("a", True, 0.0, nbytes=10), Standing("b", False, 6.0, nbytes=30, steps=9),
    ...       Standing("c", False, 5.0, nbytes=20, steps=1)]
    >>> [s.name for s in victims(rs, 10.0, 600.0, free_bytes=25)]
    ['a', 'c']
    >>> [s.name for s in victims(rs, 10.0, 600.0, count=1)], [s.name for s in victims(rs, 10.0, 600.0, free_bytes=99)]
    (['a'], ['a', 'c'])
    """
    out: list[Standing] = []
    freed = 0
    order = eviction_order(runs, now, idle_after_s)
    for i, s in enumerate(order):
        need_count = len(out) < count
        need_bytes = freed < free_bytes and not (keep_one and i == len(order) - 1)
        if not (need_count or need_bytes):
            break
        out.append(s)
        freed += s.nbytes
    return out
