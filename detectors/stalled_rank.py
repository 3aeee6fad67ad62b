"""``stalled_rank``: a rank stopped reporting while the others go on.

The aggregator merges a step without the ranks whose reports have not arrived within its merge timeout
(``aggregator.merge_timeout_s``, 30 s by default) and records them in ``StepStats.missing_ranks``. This
detector raises a critical finding naming those ranks once they have been missing for ``window``
consecutive merged steps; it clears when they report again.

>>> from gfservice.testing import make_step, replay
>>> steps = [make_step(step=i, sum_sq=[1.0]) for i in range(3)]
>>> steps += [make_step(step=i, sum_sq=[1.0], missing_ranks=(3,)) for i in range(3, 6)]
>>> f = replay(StalledRank(window=2), steps)[0]
>>> f.step, f.ranks, f.severity.value
(4, [3], 'critical')
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from gfservice.api import Detector, DetectorConfig, Finding, StepStats


class StalledRank(Detector):
    """A rank that stopped reporting while the others go on (hung, dead or partitioned worker)."""

    name = "stalled_rank"

    class Config(DetectorConfig):
        #: Consecutive merged steps a rank must be missing before it is reported.
        window: int = Field(2, ge=1)

    def __init__(self, config=None, **overrides):
        super().__init__(config, **overrides)
        self._streak: dict[int, int] = {}

    def update(self, step: StepStats) -> list[Finding]:
        missing = set(step.missing_ranks)
        self._streak = {r: self._streak.get(r, 0) + 1 for r in missing}
        stalled = sorted(r for r, n in self._streak.items() if n >= self.config.window)
        if not stalled:
            return []
        names = ", ".join(map(str, stalled))
        return [
            self.finding(
                step,
                "critical",
                f"rank {names} sent nothing for the last {self.config.window}+ merged steps (now step {step.step}); "
                "the job may hang at its next collective: check that worker's logs and node",
                ranks=stalled,
                value=len(stalled),
                threshold=0,
                key="ranks",
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"streak": dict(self._streak)}

    def load_state_dict(self, state) -> None:
        self._streak = {int(k): int(v) for k, v in state.get("streak", {}).items()}
