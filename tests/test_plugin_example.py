"""The example third-party plugin (examples/gfservice-plugin-underflow) is found through its entry point and runs
in the service like a built-in detector. It must be installed: this test fails, with the command, when it is not."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest

from gfservice import registry
from gfservice.service.aggregator import Aggregator
from gfservice.stats import GradStats

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gfservice-plugin-underflow"
INSTALL = f"{sys.executable} -m pip install {EXAMPLE}"


def _underflow_cls():
    """The installed plugin's class; fails (not skips) with the install command when it is missing."""
    names = {ep.name: ep for ep in entry_points(group=registry.GROUP)}
    if "underflow" not in names:
        pytest.fail(f"the example plugin 'underflow' is not installed; install it with: {INSTALL}", pytrace=False)
    registry.available.cache_clear()
    cls = registry.available().get("underflow")
    assert cls is not None, f"entry point {names['underflow'].value} is registered but failed to load"
    return cls


def _deep_report(step: int, scales: dict[str, float], rng) -> dict:
    grads = {name: rng.normal(0, s, 3000) for name, s in scales.items()}
    stats = GradStats.from_arrays(grads, deep=True).arrays()
    return {"kind": "step", "run": "amp", "rank": 0, "step": step, "stats": stats}


def _core_report(step: int, n: int) -> dict:
    return {"kind": "step", "run": "amp", "rank": 0, "step": step, "count": [3000] * n, "sum_sq": [1.0] * n,
            "max_abs": [0.1] * n, "nonfinite": [0] * n}


def test_underflow_is_discovered_through_its_entry_point():
    underflow_cls = _underflow_cls()
    assert underflow_cls.__module__ == "gfservice_underflow.underflow"
    row = next(r for r in registry.describe() if r["name"] == "underflow")
    assert row["summary"].startswith("Gradient underflow")
    assert row["fields"]["format"][0] == "fp16" and row["fields"]["max_fraction"][0] == 0.01
    assert row["fields"]["enabled"][0] is False  # opt-in: it judges a format the run may not use
    assert "underflow" not in registry.build()
    assert registry.build({"underflow": {"enabled": True}})["underflow"].config.format == "fp16"


def test_underflow_runs_in_an_aggregator():
    _underflow_cls()
    layers = ["embed.weight", "head.weight"]
    agg = Aggregator(detector_settings={"underflow": {"enabled": True, "format": "fp16", "max_fraction": 0.02}})
    assert agg.submit({"kind": "layout", "run": "amp", "rank": 0, "world_size": 1, "layers": layers,
                       "numel": [3000, 3000], "sharded": [False, False]}).accepted
    rng = np.random.default_rng(0)
    news = []
    for step in range(8):
        if step in (0, 4):  # deep steps; on step 4 the embedding's gradients are tiny
            msg = _deep_report(step, {"embed.weight": 1e-3 if step == 0 else 3e-7, "head.weight": 1e-2}, rng)
        else:
            msg = _core_report(step, 2)
        ack = agg.submit(msg)
        assert ack.accepted, ack.reason
        news += [f for f in ack.new_findings if f.detector == "underflow"]
    (f,) = news
    assert (f.first_step, f.layers, f.threshold) == (4, ["embed.weight"], 0.02)
    assert "would flush to zero in fp16" in f.message
    # the core-only steps 5-7 were not judged: the finding is still active
    assert [a.detector for a in agg.active_findings("amp")] == ["underflow"]
    assert agg.run_view("amp").detector_errors == {}
    ack = agg.submit(_deep_report(8, {"embed.weight": 1e-3, "head.weight": 1e-2}, rng))
    assert ack.accepted and agg.active_findings("amp") == []  # a healthy deep step clears it


def test_the_example_plugins_doctest_pins_its_firing_step():
    """The plugin's docstring example runs (its own tests run with: cd examples/gfservice-plugin-underflow &&
    python -m pytest -q)."""
    import doctest

    module = sys.modules[_underflow_cls().__module__]
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0
