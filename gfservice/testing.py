"""The plugin author's kit: build synthetic steps, replay them through a detector, check the contract.

>>> from gfservice.testing import make_step, replay
>>> from gfservice_detectors.nonfinite import NonFinite
>>> steps = [make_step(step=i, sum_sq=[1.0, 1.0]) for i in range(5)]
>>> steps.append(make_step(step=5, sum_sq=[1.0, float("nan")], nonfinite=[0, 3]))
>>> [(f.step, f.layers) for f in replay(NonFinite(), steps)]
[(5, ['layer1'])]
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Sequence

import numpy as np

from gfservice.api import Detector, DetectorConfig, Finding, StepStats
from gfservice.stats import GradStats


def make_step(
    *,
    step: int = 0,
    run: str = "test",
    sum_sq: Sequence[float],
    count: Sequence[int] | int = 1000,
    max_abs: Sequence[float] | None = None,
    nonfinite: Sequence[int] | None = None,
    sum_abs: Sequence[float] | None = None,
    zeros: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    **scalars,
) -> StepStats:
    """A :class:`StepStats` from per-layer sums; the rest is filled in consistently.

    ``max_abs`` defaults to the RMS, ``nonfinite`` to zero. Other keywords (``loss``, ``lr``,
    ``rank_nonfinite``, ...) go to :class:`StepStats` as they are.
    """
    sq = np.asarray(sum_sq, dtype=np.float64)
    n = len(sq)
    cnt = np.broadcast_to(np.asarray(count, dtype=np.int64), (n,)).copy()
    grads = GradStats(
        layers=tuple(layers) if layers is not None else tuple(f"layer{i}" for i in range(n)),
        count=cnt,
        sum_sq=sq,
        max_abs=np.asarray(max_abs, np.float64) if max_abs is not None else np.sqrt(sq / cnt),
        nonfinite=np.asarray(nonfinite, np.int64) if nonfinite is not None else np.zeros(n, np.int64),
        sum_abs=None if sum_abs is None else np.asarray(sum_abs, np.float64),
        zeros=None if zeros is None else np.asarray(zeros, np.int64),
    )
    for k in ("rank_norm", "rank_nonfinite", "step_time", "weight_norm", "update_ratio"):
        if k in scalars and scalars[k] is not None:
            scalars[k] = np.asarray(scalars[k])
    return StepStats(run=run, step=step, grads=grads, **scalars)


def replay(detector: Detector, steps: Iterable[StepStats]) -> list[Finding]:
    """Feed ``steps`` to ``detector`` in order and return every finding it produced.

    A step the detector does not judge (``update`` returns ``None``) adds nothing, as in the aggregator.
    """
    out: list[Finding] = []
    for s in steps:
        out.extend(detector.update(s) or ())
    return out


def _checked_replay(detector: Detector, steps: Sequence[StepStats]) -> list[Finding]:
    out: list[Finding] = []
    name = type(detector).name
    for s in steps:
        found = detector.update(s)
        assert found is None or isinstance(found, list), (
            f"{name}: update returned {type(found).__name__}; return a list of findings (None: step not judged)"
        )
        for f in found or ():
            assert isinstance(f, Finding) and f.detector == name and f.run == s.run, f"{name}: bad finding {f!r}"
        out.extend(found or ())
    return out


def check_detector(cls: type[Detector], steps: Sequence[StepStats]) -> None:
    """Assert the plugin contract on ``steps``; raises ``AssertionError`` naming what is wrong.

    - ``name`` set, a one-line docstring summary, ``Config`` a :class:`DetectorConfig` with defaults;
    - ``update`` returns a list of :class:`Finding` with this detector's name and the step's run;
    - ``state_dict`` pickles, and a detector restored from it half-way produces the same findings
      on the rest of the steps as the original.
    """
    assert cls.name, f"{cls.__qualname__} has no name"
    assert cls.summary(), f"{cls.name}: add a docstring whose first line says what it detects"
    assert issubclass(cls.Config, DetectorConfig), f"{cls.name}: Config must subclass DetectorConfig"
    cls.Config()  # every field needs a default
    half = len(steps) // 2
    original = cls()
    _checked_replay(original, steps[:half])
    state = pickle.loads(pickle.dumps(original.state_dict()))
    resumed = cls()
    resumed.load_state_dict(state)
    rest_a = [f.model_dump(exclude={"time"}) for f in _checked_replay(original, steps[half:])]
    rest_b = [f.model_dump(exclude={"time"}) for f in _checked_replay(resumed, steps[half:])]
    assert rest_a == rest_b, f"{cls.name}: a detector restored from state_dict() behaves differently"
