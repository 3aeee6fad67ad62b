"""The plugin kit's ``check_detector`` restores detector state the way the service does (its snapshot codec), so a
plugin that passes the kit also snapshots and restores in the service. A detector that keeps a ``deque`` and
assigns the saved value back as it comes passes a pickle round trip but not a restart of the service: the
snapshot is JSON, and the deque comes back as a list without its ``maxlen``."""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Mapping
from typing import Any

import pytest

from gfservice.api import Detector, DetectorConfig, Finding, StepStats
from gfservice.service.state import read_snapshot, write_snapshot
from gfservice.testing import check_detector, make_step, replay, restored_state


class WindowConfig(DetectorConfig):
    window: int = 4
    factor: float = 3.0


class BrokenWindow(Detector):
    """Gradient norm above ``factor`` times its mean over the last ``window`` steps."""

    name = "window"
    Config = WindowConfig
    config: WindowConfig

    def __init__(self, config: Any = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.norms: deque[float] = deque(maxlen=self.config.window)

    def update(self, step: StepStats) -> list[Finding]:
        norm = float(step.global_norm)
        full = len(self.norms) >= self.config.window
        mean = sum(self.norms) / max(len(self.norms), 1)
        self.norms.append(norm)
        if full and norm > self.config.factor * mean:
            return [self.finding(step, "warning", f"gradient norm {norm:.3g} is {norm / mean:.1f}x its recent mean",
                                 value=norm, threshold=self.config.factor * mean)]
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"norms": self.norms}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.norms = state["norms"]  # the bug: after a snapshot this is a list, which grows without bound


class FixedWindow(BrokenWindow):
    """Gradient norm above ``factor`` times its mean over the last ``window`` steps."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.norms = deque(state["norms"], maxlen=self.config.window)


class Opaque(FixedWindow):
    """Gradient norm above ``factor`` times its mean, with state the service cannot save."""

    def state_dict(self) -> dict[str, Any]:
        return {"norms": self.norms, "last": object()}


def _steps() -> list[StepStats]:
    """Norm 10 for ten steps (the kit restores here, half-way), 1 for five, then 5 once: five times the mean of the
    last four steps, a finding at step 15. A restored detector that forgot the window's length still counts the
    tens in its mean and stays quiet."""
    norms = [10.0] * 10 + [1.0] * 5 + [5.0] + [1.0] * 4
    return [make_step(step=i, sum_sq=[n * n]) for i, n in enumerate(norms)]


def test_the_broken_window_passes_a_pickle_round_trip_the_old_kit_did():
    steps = _steps()
    original, resumed = BrokenWindow(), BrokenWindow()
    replay(original, steps[:10])
    resumed.load_state_dict(pickle.loads(pickle.dumps(original.state_dict())))
    assert [f.step for f in replay(original, steps[10:])] == [f.step for f in replay(resumed, steps[10:])] == [15]


def test_the_kit_catches_the_window_that_breaks_after_a_service_restart():
    with pytest.raises(AssertionError, match=r"window: a detector restored from state_dict\(\) behaves differently.*"
                                             r"deque\(state\['window'\], maxlen=\.\.\.\)"):
        check_detector(BrokenWindow, _steps())
    check_detector(FixedWindow, _steps())


def test_the_kit_restores_what_the_service_reads_back_from_its_snapshot(tmp_path):
    """restored_state is the service's snapshot file, without the file: the same codec both ways."""
    det = BrokenWindow()
    replay(det, _steps()[:10])
    path = write_snapshot(tmp_path / "state" / "snapshot.json", {"detectors": {"window": det.state_dict()}})
    from_file = read_snapshot(path)["state"]["detectors"]["window"]
    assert from_file == restored_state(det.state_dict()) == {"norms": [10.0] * 4}
    assert type(from_file["norms"]) is list  # not a deque: what load_state_dict must rebuild
    broken, fixed = BrokenWindow(), FixedWindow()
    broken.load_state_dict(from_file)
    fixed.load_state_dict(from_file)
    assert [f.step for f in replay(broken, _steps()[10:])] == []  # the service would miss it after a restart
    assert [f.step for f in replay(fixed, _steps()[10:])] == [15]


def test_the_kit_refuses_state_the_service_cannot_snapshot():
    with pytest.raises(AssertionError, match=r"window: the service cannot snapshot this state \(window\.state_dict"
                                             r"\(\)\.last: a object cannot be saved"):
        check_detector(Opaque, _steps())


class Deep(FixedWindow):
    """Gradient norm above ``factor`` times its mean, with state nested too deep for a snapshot to restore."""

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"norms": self.norms}
        for _ in range(200):
            state = {"inner": state}
        return state


def test_the_kit_refuses_state_nested_too_deep_for_a_snapshot():
    with pytest.raises(AssertionError, match=r"window: the service cannot snapshot this state .*nested more than"):
        check_detector(Deep, _steps())
