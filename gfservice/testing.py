"""The plugin author's kit: build synthetic steps, replay them through a detector, check the contract.

>>> from gfservice.testing import make_step, replay
>>> from gfservice_detectors.nonfinite import NonFinite
>>> steps = [make_step(step=i, sum_sq=[1.0, 1.0]) for i in range(5)]
>>> steps.append(make_step(step=5, sum_sq=[1.0, float("nan")], nonfinite=[0, 3]))
>>> [(f.step, f.layers) for f in replay(NonFinite(), steps)]
[(5, ['layer1'])]
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from gfservice.api import Detector, DetectorConfig, Finding, StepStats
from gfservice.service.state import decode, encode_detector_state
from gfservice.stats import STATISTICS, GradStats

#: How deep a detector's encoded state may nest: gfservice.service.snapshot.detector_state leaves this much of
#: SNAPSHOT_MAX_DEPTH for its place in the snapshot, and does not save a deeper one.

__all__ = ["check_detector", "make_step", "replay", "restored_state"]


def make_step(
    *,
    step: int = 0,
    run: str = "test",
    sum_sq: Sequence[float],
    count: Sequence[int] | int = 1000,
    max_abs: Sequence[float] | None = None,
    nonfinite: Sequence[int] | None = None,
    layers: Sequence[str] | None = None,
    units: Sequence[int] | int | None = None,
    weight_norm: Sequence[float] | None = None,
    update_ratio: Sequence[float] | None = None,
    **extra: Any,
) -> StepStats:
    """A :class:`StepStats` from per-layer sums; the rest is filled in consistently.

    ``max_abs`` defaults to the RMS, ``nonfinite`` to zero. Any other statistic of
    :data:`gfservice.stats.STATISTICS` (``sum_abs``, ``zeros``, ``exp_hist``, ``dead_units``, ``weight_sq``,
    ...) may be given by name; ``weight_norm`` and ``update_ratio`` are turned into the sums of squares that
    travel. Other keywords (``loss``, ``lr``, ``rank_norm``, ``ranks``, ``group_lr``, ``group_wd``, ``layer_group``,
    ``layer_kinds``, ``precision``, ...) go to :class:`StepStats` (as arrays or tuples where it holds those).

    >>> s = make_step(sum_sq=[4.0, 1.0], count=4, weight_norm=[2.0, 1.0], update_ratio=[1e-3, 1e-2])
    >>> s.grads.rms.tolist(), s.update_ratio.round(6).tolist()
    ([1.0, 0.5], [0.001, 0.01])
    """
    sq = np.asarray(sum_sq, dtype=np.float64)
    n = len(sq)
    cnt = np.broadcast_to(np.asarray(count, dtype=np.int64), (n,)).copy()
    arrays: dict[str, Any] = {
        "count": cnt,
        "sum_sq": sq,
        "max_abs": np.asarray(max_abs, np.float64) if max_abs is not None else np.sqrt(sq / np.maximum(cnt, 1)),
        "nonfinite": np.asarray(nonfinite, np.int64) if nonfinite is not None else np.zeros(n, np.int64),
    }
    if weight_norm is not None:
        wn = np.asarray(weight_norm, np.float64)
        arrays["weight_sq"] = wn**2
        if update_ratio is not None:
            arrays["update_sq"] = (np.asarray(update_ratio, np.float64) * wn) ** 2
    for s in STATISTICS:
        if s.name in extra:
            value = extra.pop(s.name)
            arrays[s.name] = None if value is None else np.asarray(value, s.dtype)
    grads = GradStats(
        layers=tuple(layers) if layers is not None else tuple(f"layer{i}" for i in range(n)),
        units=None if units is None else np.broadcast_to(np.asarray(units, np.int64), (n,)).copy(),
        **arrays,
    )
    for k in ("rank_norm", "rank_nonfinite", "step_time", "compute_time", "group_lr", "group_wd"):
        if k in extra and extra[k] is not None:
            extra[k] = np.asarray(extra[k], np.float64 if k.startswith("group_") else None)
    for k in ("layer_group", "ranks"):
        if extra.get(k) is not None:
            extra[k] = np.asarray(extra[k], np.int64)
    if extra.get("layer_kinds") is not None:
        extra["layer_kinds"] = tuple(extra["layer_kinds"])
    return StepStats(run=run, step=step, grads=grads, **extra)


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


def restored_state(state: Mapping[str, Any], where: str = "state") -> Any:
    """``state`` as a detector gets it back after the service snapshots it and restarts from the snapshot.

    The service's own codec (:func:`gfservice.service.state.encode`, then the JSON text of the snapshot file, then
    :func:`~gfservice.service.state.decode`, what ``read_snapshot`` does on load): numpy arrays, tuples, sets and
    dicts with non-string keys come back as themselves, a ``deque`` comes back as a ``list``, and anything that is
    not plain data, or nests too deep to restore, is refused with a ``TypeError`` naming where it is (the service
    does not save such a state: the detector starts fresh after a restart).

    >>> from collections import deque
    >>> restored_state({"window": deque([1.0, 2.0], maxlen=2), "seen": (3, 4)})
    {'window': [1.0, 2.0], 'seen': (3, 4)}
    >>> restored_state({"model": object()}, "detector x")
    Traceback (most recent call last):
    ...
    TypeError: detector x.model: a object cannot be saved in a snapshot (plain data and numpy only)
    """
    try:
        encoded = encode_detector_state(state, where)
    except ValueError as exc:
        raise TypeError(f"{where}: {exc}") from None
    return decode(json.loads(json.dumps(encoded)))


def check_detector(cls: type[Detector], steps: Sequence[StepStats]) -> None:
    """Assert the plugin contract on ``steps``; raises ``AssertionError`` naming what is wrong.

    - ``name`` set, a one-line docstring summary, ``Config`` a :class:`DetectorConfig` with defaults;
    - ``update`` returns a list of :class:`Finding` with this detector's name and the step's run;
    - ``state_dict`` is what the service can snapshot, and a detector restored from it half-way, the way the
      service restores one after a restart (:func:`restored_state`), produces the same findings on the rest of
      the steps as the original.
    """
    assert cls.name, f"{cls.__qualname__} has no name"
    assert cls.summary(), f"{cls.name}: add a docstring whose first line says what it detects"
    assert issubclass(cls.Config, DetectorConfig), f"{cls.name}: Config must subclass DetectorConfig"
    cls.Config()  # every field needs a default
    half = len(steps) // 2
    original = cls()
    _checked_replay(original, steps[:half])
    saved = original.state_dict()
    assert isinstance(saved, Mapping), f"{cls.name}: state_dict returned {type(saved).__name__}, not a mapping"
    try:
        state = restored_state(saved, f"{cls.name}.state_dict()")
    except TypeError as exc:
        raise AssertionError(f"{cls.name}: the service cannot snapshot this state ({exc}): keep state_dict() to "
                             "plain data (dicts, lists, tuples, sets, numbers, strings, numpy arrays)") from None
    resumed = cls()
    try:
        resumed.load_state_dict(state)
    except Exception as exc:
        raise AssertionError(f"{cls.name}: load_state_dict fails on the state as the service restores it "
                             f"({type(exc).__name__}: {exc})") from exc
    rest_a = [f.model_dump(exclude={"time"}) for f in _checked_replay(original, steps[half:])]
    rest_b = [f.model_dump(exclude={"time"}) for f in _checked_replay(resumed, steps[half:])]
    assert rest_a == rest_b, (
        f"{cls.name}: a detector restored from state_dict() behaves differently. The service snapshots it as "
        "JSON: a deque comes back as a list (without its maxlen); rebuild such containers in load_state_dict "
        "(e.g. deque(state['window'], maxlen=...))")
