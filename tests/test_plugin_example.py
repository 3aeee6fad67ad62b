"""The example third-party plugin (examples/gfservice-plugin-plateau) is found through its entry point and runs in
the service like a built-in detector. It must be installed: this test fails, with the command, when it is not."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from gfservice import registry
from gfservice.service.aggregator import Aggregator

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gfservice-plugin-plateau"
INSTALL = f"{sys.executable} -m pip install -e {EXAMPLE}"


def _plateau_cls():
    """The installed plugin's class; fails (not skips) with the install command when it is missing."""
    names = {ep.name: ep for ep in entry_points(group=registry.GROUP)}
    if "plateau" not in names:
        pytest.fail(f"the example plugin 'plateau' is not installed; install it with: {INSTALL}", pytrace=False)
    registry.available.cache_clear()
    cls = registry.available().get("plateau")
    assert cls is not None, f"entry point {names['plateau'].value} is registered but failed to load"
    return cls


def _report(step: int, loss: float | None) -> dict:
    return {"kind": "step", "run": "flat", "rank": 0, "step": step, "count": [100, 10], "sum_sq": [1.0, 1.0],
            "max_abs": [0.1, 0.1], "nonfinite": [0, 0], "loss": loss}


def test_plateau_is_discovered_through_its_entry_point():
    plateau_cls = _plateau_cls()
    assert plateau_cls.__module__ == "gfservice_plateau.plateau"
    row = next(r for r in registry.describe() if r["name"] == "plateau")
    assert row["summary"].startswith("Loss plateau")
    assert row["fields"]["patience"][0] == 500 and row["fields"]["min_improvement"][0] == 0.01
    assert row["fields"]["enabled"][0] is False  # opt-in: a plateau is not always a fault
    assert "plateau" not in registry.build()
    assert registry.build({"plateau": {"enabled": True}})["plateau"].config.severity == "info"


def test_plateau_runs_in_an_aggregator():
    _plateau_cls()
    agg = Aggregator(detector_settings={"plateau": {"enabled": True, "patience": 10, "smoothing": 1,
                                                    "severity": "warning"}})
    assert agg.submit({"kind": "layout", "run": "flat", "rank": 0, "world_size": 1, "layers": ["w", "b"],
                       "numel": [100, 10], "sharded": [False, False]}).accepted
    news = []
    for step in range(30):
        loss = 2.0 * 0.9**step if step < 10 else 0.7  # falls for 10 steps, then flat
        ack = agg.submit(_report(step, loss if step != 25 else None))
        assert ack.accepted, ack.reason
        news += [f for f in ack.new_findings if f.detector == "plateau"]
    (f,) = news
    assert f.first_step == 20 and f.severity.value == "warning" and f.threshold == 10  # best at step 10
    assert "has not improved by 1% for 10 steps" in f.message
    # step 25 had no loss (not judged) and did not clear it: still active at the end
    assert [a.detector for a in agg.active_findings("flat")] == ["plateau"]
    assert agg.run_view("flat").detector_errors == {}
    ack = agg.submit(_report(30, 0.1))
    assert ack.accepted and agg.active_findings("flat") == []  # the loss improves: cleared


def test_the_example_plugins_doctest_pins_its_firing_step():
    """The plugin's docstring example runs (its own tests run with: cd examples/gfservice-plugin-plateau &&
    python -m pytest -q)."""
    import doctest

    module = sys.modules[_plateau_cls().__module__]
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0
