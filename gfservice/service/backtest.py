"""Backtests (plain Python, no Ray, no torch): replay a run's saved merged steps through a fresh set of
detectors built from a configuration, through the aggregator's own detector and finding lifecycle
(:meth:`Aggregator.replay <gfservice.service.aggregator.Aggregator.replay>`), and compare what two
configurations would have raised, and what a guard configuration (guard mode) would have skipped
(:func:`guard_backtest`). ``gfservice backtest`` prints it.

>>> from gfservice.testing import make_step
>>> steps = [make_step(step=i, run="exp", sum_sq=[1.0, float("nan") if i in (5, 6) else 1.0]) for i in range(10)]
>>> (found,) = backtest(steps, {}, only=["nonfinite"]).findings
>>> found.detector, found.first_step, found.last_step, found.occurrences, found.active
('nonfinite', 5, 6, 2, False)
>>> quiet = backtest(steps, {"nonfinite": {"enabled": False}}, only=["nonfinite"])
>>> quiet.findings, quiet.skipped
([], ('nonfinite',))
>>> [(a is not None, b is not None) for a, b in pair(backtest(steps, {}, only=["nonfinite"]).findings, [])]
[(True, False)]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gfservice import registry
from gfservice.api import Finding, Severity, StepStats
from gfservice.config import AggregatorConfig
from gfservice.errors import ConfigError
from gfservice.service.aggregator import Aggregator
from gfservice.training.guard import GuardConfig, replay

__all__ = ["Backtest", "GuardBacktest", "backtest", "guard_backtest", "pair", "severity_counts"]

#: Findings a backtest keeps (the aggregator's bounded log): far more than any sane configuration raises.
MAX_FINDINGS = 1_000_000


@dataclass(frozen=True)
class Backtest:
    """What one configuration would have raised on a run's history."""

    run: str
    steps: int
    #: The detector settings used (detector name -> field overrides).
    settings: Mapping[str, Mapping[str, Any]]
    #: Detectors that ran, with their full configuration (field -> value).
    detectors: Mapping[str, Mapping[str, Any]]
    #: Detectors asked for (``only``) that the configuration disables.
    skipped: tuple[str, ...]
    #: Every finding raised, oldest first, with its lifecycle (first and last step, occurrences).
    findings: list[Finding]
    #: Steps on which a detector raised an exception, by detector.
    errors: Mapping[str, int]
    #: Seconds spent in each detector.
    seconds: Mapping[str, float]
    #: Why the run would have been asked to stop (a detector with ``stop_run``), or None.
    stop_reason: str | None


def backtest(steps: Sequence[StepStats], settings: Mapping[str, Mapping[str, Any]] | None = None,
             only: Sequence[str] | None = None, progress: Callable[[int], None] | None = None) -> Backtest:
    """Run ``steps`` (merged steps of one run, oldest first) through detectors built from ``settings``.

    ``only`` restricts the detectors to the named ones. Raises :class:`ConfigError` for an unknown detector
    or a bad field, ``ValueError`` for an empty history or steps that do not increase.
    """
    if not steps:
        raise ValueError("the history holds no merged steps")
    settings = registry.validate(settings)
    built = registry.build(settings)
    skipped: tuple[str, ...] = ()
    if only is not None:
        installed = registry.available()
        unknown = [n for n in only if n not in installed]
        if unknown:
            raise ConfigError(f"unknown detector {unknown[0]!r}; installed: {', '.join(installed)}")
        skipped = tuple(n for n in only if n not in built)
        built = {n: d for n, d in built.items() if n in only}
    configs = {n: d.config.model_dump(mode="json") for n, d in built.items()}
    run = steps[0].run
    agg = Aggregator(AggregatorConfig(history=1, findings_history=MAX_FINDINGS), detector_factory=lambda: built)
    findings = agg.replay(run, steps, progress)
    view = agg.run_view(run)
    return Backtest(run=run, steps=len(steps), settings=settings, detectors=configs, skipped=skipped,
                    findings=findings, errors=dict(view.detector_errors), seconds=dict(view.detector_seconds),
                    stop_reason=view.stop_reason)


@dataclass(frozen=True)
class GuardBacktest:
    """What one guard configuration would have done on a run's history (its collected steps)."""

    run: str
    steps: int
    config: GuardConfig
    #: The steps it would have skipped (or, with ``clip``, rescaled), with the reason of each.
    skipped: list[tuple[int, str]]
    #: Poisoned steps it would have let through after ``max_consecutive`` in a row.
    let_through: list[tuple[int, str]]


def guard_backtest(steps: Sequence[StepStats], config: GuardConfig | None = None) -> GuardBacktest:
    """Replay the guard ``config`` (default: its defaults) over ``steps``: "how many steps would this guard have
    skipped?". Judged from each step's pre-clip global gradient norm, its NaN/Inf flags and its loss; a history
    collected every k-th step judges those steps only.

    >>> from gfservice.testing import make_step
    >>> steps = [make_step(step=i, run="exp", sum_sq=[1.0, 1.0]) for i in range(40)]
    >>> steps.append(make_step(step=40, run="exp", sum_sq=[1e8, 1.0]))
    >>> guard_backtest(steps).skipped
    [(40, 'gradient_norm')]
    """
    if not steps:
        raise ValueError("the history holds no merged steps")
    config = config or GuardConfig()
    rows = ((s.step, float(s.global_norm), bool(s.grads.nonfinite.any()) or not math.isfinite(float(s.global_norm)),
             s.loss, s.lr) for s in steps)
    guard = replay(config, rows)
    return GuardBacktest(steps[0].run, len(steps), config, guard.skipped, guard.let_through)


def _overlap(a: Finding, b: Finding) -> bool:
    return a.since <= _last(b) and b.since <= _last(a)


def _last(f: Finding) -> int:
    return f.last_step if f.last_step is not None else f.since


def pair(a: Sequence[Finding], b: Sequence[Finding]) -> list[tuple[Finding | None, Finding | None]]:
    """Match the findings of two backtests of one history: the same detector and key, over overlapping steps.

    Each finding appears once, alone (``None`` on the other side) when the other configuration raised
    nothing like it; rows come in the order of their first step.
    """
    by_id: dict[tuple[str, str], tuple[list[Finding], list[Finding]]] = {}
    for side, found in ((0, a), (1, b)):
        for f in found:
            by_id.setdefault(f.identity, ([], []))[side].append(f)
    rows: list[tuple[Finding | None, Finding | None]] = []
    for left, right in by_id.values():
        left.sort(key=lambda f: f.since)
        right.sort(key=lambda f: f.since)
        i = j = 0
        while i < len(left) or j < len(right):
            if i < len(left) and j < len(right) and _overlap(left[i], right[j]):
                rows.append((left[i], right[j]))
                i, j = i + 1, j + 1
            elif j >= len(right) or (i < len(left) and _last(left[i]) < right[j].since):
                rows.append((left[i], None))
                i += 1
            else:
                rows.append((None, right[j]))
                j += 1
    return sorted(rows, key=lambda r: min(f.since for f in r if f is not None))


def severity_counts(findings: Sequence[Finding]) -> dict[str, int]:
    """Findings by severity, most severe first (only severities that occur)."""
    counts = {s.value: 0 for s in sorted(Severity, key=lambda s: -s.rank)}
    for f in findings:
        counts[f.severity.value] += 1
    return {s: n for s, n in counts.items() if n}
