"""Judging: the detectors of a run called on a merged step, on worker threads, each call within a time budget.

A run's detectors are called one after another on one worker thread (:class:`Job`); the caller waits for
each call at most ``AggregatorConfig.detector_time_budget_s`` and gives up on a call past it (the worker then
drops what that call returns, and the detectors after it go on in a new job). A detector that raises or
returns anything but ``None`` or a list of this run's findings makes an error (:func:`call`). What comes of
the calls is settled into the run's findings by :func:`gfservice.service.findings.settle`.

>>> from gfservice.testing import make_step
>>> class Quiet:
...     def update(self, stats):
...         return None
>>> class Wrong:
...     def update(self, stats):
...         return "oops"
>>> [(o.name, o.found, type(o.error).__name__) for o in
...  call_detectors(make_step(sum_sq=[1.0]), [("quiet", Quiet()), ("wrong", Wrong())], budget_s=5.0)]
[('quiet', None, 'NoneType'), ('wrong', None, 'TypeError')]
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Sequence
from typing import NamedTuple

from gfservice.api import Detector, Finding, StepStats
from gfservice.service import findings
from gfservice.service.runs import Run, Table
from gfservice.service.view import publish

__all__ = ["WORKERS", "Job", "Outcome", "Workers", "call", "call_detectors", "judge_steps"]


class Outcome(NamedTuple):
    """What one detector call gave: findings (or None), or an error, or nothing in time."""

    name: str
    found: list[Finding] | None
    error: BaseException | None
    seconds: float
    timed_out: bool = False


def call(name: str, det: Detector, stats: StepStats) -> Outcome:
    """Call ``det`` on ``stats``; every failure, a bad return value included, is an error of the outcome."""
    t0 = time.perf_counter()
    try:
        found = det.update(stats)
        if found is not None:
            if not isinstance(found, list):
                raise TypeError(f"update returned {type(found).__name__}, not a list of Finding")
            for f in found:
                if not isinstance(f, Finding):
                    raise TypeError(f"update returned a list holding a {type(f).__name__}, not Finding")
                if f.run != stats.run:
                    raise ValueError(f"update returned a finding of run {f.run!r} for run {stats.run!r}")
        return Outcome(name, found, None, time.perf_counter() - t0)
    except BaseException as exc:  # a plugin's SystemExit must not end a worker silently either
        return Outcome(name, None, exc, time.perf_counter() - t0)


class Job:
    """The detector calls of one step, made in order on a worker thread. The waiting caller abandons the job
    when a call runs past its time budget; the worker then drops whatever that call returns and stops."""

    def __init__(self, stats: StepStats, detectors: Sequence[tuple[str, Detector]]):
        self.stats = stats
        self.detectors = detectors
        self.cond = threading.Condition()
        self.outcomes: list[Outcome] = []
        #: When the current call began (``time.perf_counter``); None between calls.
        self.started: float | None = None
        self.abandoned = False

    def run(self) -> None:
        for name, det in self.detectors:
            with self.cond:
                if self.abandoned:
                    return
                self.started = time.perf_counter()
                self.cond.notify_all()
            outcome = call(name, det, self.stats)
            with self.cond:
                if self.abandoned:
                    return
                self.outcomes.append(outcome)
                self.started = None
                self.cond.notify_all()


class Workers:
    """Daemon threads that run :class:`Job` s, started on demand and stopped after a minute idle. A thread
    stuck in a hung detector is simply written off: it no longer counts, and a new thread takes the next job."""

    def __init__(self, idle_s: float = 60.0):
        self._idle_s = idle_s
        self.reset()

    def reset(self) -> None:
        """Forget every thread (a forked child has none of its parent's)."""
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        #: Threads waiting for a job, less the jobs queued for them.
        self._idle = 0

    def start(self, job: Job) -> None:
        with self._lock:
            spawn = self._idle <= 0
            if not spawn:
                self._idle -= 1
        if spawn:
            try:
                threading.Thread(target=self._loop, name="gfservice-detectors", daemon=True).start()
            except RuntimeError:  # no thread to be had: run the job on the caller's thread
                job.run()
                return
        self._jobs.put(job)

    def _loop(self) -> None:
        while True:
            try:
                job = self._jobs.get(timeout=self._idle_s)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # more threads wait than there are jobs: this one may go
                        self._idle -= 1
                        return
                continue
            job.run()
            with self._lock:
                self._idle += 1


#: The detector threads of every aggregator of this process.
WORKERS = Workers()
os.register_at_fork(after_in_child=WORKERS.reset)


def call_detectors(stats: StepStats, detectors: Sequence[tuple[str, Detector]], budget_s: float,
                   workers: Workers = WORKERS) -> list[Outcome]:
    """Each detector's outcome on ``stats``, in order; a call past ``budget_s`` seconds is given up on."""
    budget = budget_s
    outcomes: list[Outcome] = []
    while detectors:
        job = Job(stats, detectors)
        workers.start(job)
        with job.cond:
            idle_waits = 0
            while len(job.outcomes) < len(detectors):
                started = job.started
                if started is None:  # between calls, or the worker has not picked the job up yet
                    done = len(job.outcomes)
                    job.cond.wait(budget)
                    idle_waits = idle_waits + 1 if len(job.outcomes) == done and job.started is None else 0
                    if idle_waits < 2:
                        continue
                elif (left := started + budget - time.perf_counter()) > 0:
                    job.cond.wait(left)
                    continue
                job.abandoned = True
                break
            done_outcomes = list(job.outcomes)
        outcomes.extend(done_outcomes)
        if len(done_outcomes) == len(detectors):
            break
        name = detectors[len(done_outcomes)][0]
        outcomes.append(Outcome(name, None, None, budget, timed_out=True))
        detectors = detectors[len(done_outcomes) + 1:]
    return outcomes


def judge_steps(table: Table, run: Run, steps: Sequence[StepStats]) -> list[Finding]:
    """Run the detectors on ``steps`` in order and settle their findings. The caller holds ``run.judging``
    and not ``run.lock``: the detectors run without any lock that another run or a reader needs."""
    new: list[Finding] = []
    for stats in steps:
        with run.lock:
            detectors = [(n, d) for n, d in run.detectors.items() if n not in run.health.disabled]
        outcomes = call_detectors(stats, detectors, table.config.detector_time_budget_s)
        with run.lock:
            new.extend(findings.settle(run, stats, outcomes, table.config, table.clock()))
            publish(run)
    return new
