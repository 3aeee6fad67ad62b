"""``gfservice backtest`` on a history saved from a real training run, and ``configure`` of a live run in the
aggregator: validation before any change, state carried over, the change recorded and snapshotted, and the
configuration version stamped on the findings raised after it."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from models import batches, mlp
from pydantic import Field

import gfservice
from gfservice import registry
from gfservice.api import Detector, DetectorConfig, Finding, StepStats
from gfservice.cli import main
from gfservice.observability import history
from gfservice.registry import ConfigError
from gfservice.service.aggregator import Aggregator, AggregatorConfig
from gfservice.service.backtest import backtest, pair, severity_counts
from gfservice.testing import make_step

RUN = "bt-explode"
FAULT_STEP = 40


# ---- backtest ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, list[Finding]]:
    """A real in-process run (4-layer MLP on digits, SGD with momentum) whose learning rate jumps x1000 at step
    40: the gradient norm explodes, then goes NaN. Its history saved as `gfservice report --save-history` does."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = mlp(4, width=32, activation="relu", init="he")
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        mon = gfservice.monitor(model, opt, run=RUN, service=None, deep_every=10)
        data = batches(32, seed=0)
        for step in range(80):
            if step == FAULT_STEP:
                for group in opt.param_groups:
                    group["lr"] *= 1000
            x, y = next(data)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            mon.step(loss=loss)
            opt.zero_grad()
        mon.close()
        path = tmp_path_factory.mktemp("history") / "run.npz"
        history.save(path, mon.transport.aggregator.history(RUN), mon.findings)
        return path, list(mon.findings)
    finally:
        torch.set_num_threads(threads)


def _lifecycle(findings: list[Finding]) -> list[tuple[Any, ...]]:
    return [(f.detector, f.key, f.severity.value, f.first_step, f.last_step, f.occurrences, f.active)
            for f in findings]


def _table(out: str) -> list[list[str]]:
    """The table's rows, the columns split on runs of two or more spaces."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("---------"))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def _rows(out: str) -> dict[tuple[str, str], list[str]]:
    """The table's rows by (detector, key) (the first row of each)."""
    rows: dict[tuple[str, str], list[str]] = {}
    for cells in _table(out):
        rows.setdefault((cells[0], cells[2]), cells)
    return rows


def test_backtest_with_the_live_configuration_raises_what_the_live_run_raised(saved):
    path, live = saved
    steps = history.load(path).steps
    assert len(steps) == 80
    again = backtest(steps, {})
    assert _lifecycle(again.findings) == _lifecycle(live)
    assert {(f.detector, f.key) for f in live} >= {("exploding", "spike"), ("nonfinite", "grad")}
    explode = next(f for f in live if f.detector == "exploding")
    nan = next(f for f in live if f.identity == ("nonfinite", "grad"))
    assert FAULT_STEP <= explode.first_step < nan.first_step  # the explosion is seen before the first NaN


def test_cli_backtest_prints_what_would_have_fired(saved, capsys):
    path, live = saved
    assert main(["backtest", str(path)]) == 0
    out = capsys.readouterr().out
    assert [cells[:6] for cells in _table(out)] == [
        [f.detector, f.severity.value, f.key or "-", str(f.first_step), str(f.last_step), str(f.occurrences)]
        for f in live]
    assert f"run {RUN}, 80 merged steps" in out
    counts = ", ".join(f"{n} {sev}" for sev, n in severity_counts(live).items())
    assert f"\ndefaults: {len(live)} findings ({counts}), " in out


def test_cli_backtest_compares_two_configurations_side_by_side(saved, tmp_path, capsys):
    path, live = saved
    strict = tmp_path / "strict.toml"
    strict.write_text("[detectors.exploding]\nmax_norm = 50.0\n")
    quiet = tmp_path / "quiet.toml"
    quiet.write_text("[detectors.exploding]\nenabled = false\n")
    assert main(["backtest", str(path), "--config", str(strict), "--compare", str(quiet)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    header = out.splitlines()[out.splitlines().index(next(x for x in out.splitlines() if x.startswith("detector")))]
    assert "A strict" in header and "B quiet" in header
    cap = rows[("exploding", "cap")]  # only the strict configuration has a cap on the norm
    assert cap[1] == "critical" and int(cap[3]) >= FAULT_STEP and cap[4] == "-"
    assert rows[("exploding", "spike")][4] == "-"  # B runs no exploding detector at all
    nan = next(f for f in live if f.identity == ("nonfinite", "grad"))
    assert rows[("nonfinite", "grad")][3:6] == [str(nan.first_step), str(nan.first_step), "+0"]
    assert re.search(r"^A strict: \d+ findings \(\d critical", out, re.M)
    running = len(registry.build({"exploding": {"enabled": False}}))
    assert re.search(rf"^B quiet: \d+ findings \(\d+ critical.*\), {running} detectors$", out, re.M)

    assert main(["backtest", str(path), "--compare", str(quiet), "--detectors", "exploding", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    a, b = doc["configs"]
    assert set(a["detectors"]) == {"exploding"} and b["detectors"] == {} and b["skipped"] == ["exploding"]
    assert {p["key"] for p in doc["pairs"]} == {"spike"} and all(p["b_first"] is None for p in doc["pairs"])


def test_cli_backtest_errors_are_one_clear_line(saved, tmp_path, capsys):
    path, _ = saved
    assert main(["backtest", str(tmp_path / "nope.npz")]) == 1
    assert "nope.npz does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[detectors.exploding]\nz_treshold = 8.0\n")
    assert main(["backtest", str(path), "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "detector 'exploding': z_treshold: Extra inputs are not permitted" in err and "Traceback" not in err
    assert main(["backtest", str(path), "--detectors", "explodin"]) == 1
    assert "unknown detector 'explodin'" in capsys.readouterr().err
    not_history = tmp_path / "x.npz"
    np.savez(not_history, a=np.zeros(3))
    assert main(["backtest", str(not_history)]) == 1
    assert "not a gfservice history file" in capsys.readouterr().err


def test_long_histories_show_progress_on_stderr(capsys):
    steps = [make_step(step=i, run="long", sum_sq=[1.0, 1.0]) for i in range(4000)]
    from gfservice.cli.backtest import _progress

    report = _progress("A", len(steps))
    assert report is not None
    backtest(steps, {}, only=["nonfinite"], progress=report)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and lines[-1] == "A: replayed 4000/4000 steps (100%)"


def test_pairing_matches_overlapping_episodes_of_one_finding():
    def f(first: int, last: int, key: str = "spike") -> Finding:
        return Finding(detector="exploding", severity="warning", run="r", step=first, message="m", key=key,
                       first_step=first, last_step=last)

    rows = pair([f(10, 12), f(50, 51)], [f(11, 11), f(30, 30), f(50, 50, "cap")])
    assert [(a and a.since, b and b.since, (a or b).key) for a, b in rows] == [
        (10, 11, "spike"), (None, 30, "spike"), (50, None, "spike"), (None, 50, "cap")]


# ---- configure -----------------------------------------------------------------------------------------------
class Above(Detector):
    """Global gradient norm above a limit (a test detector that counts the steps it saw)."""

    name = "above"

    class Config(DetectorConfig):
        limit: float = Field(10.0, gt=0)
        window: int = Field(5, ge=1)

    def __init__(self, config: Mapping[str, Any] | DetectorConfig | None = None, **overrides: Any):
        super().__init__(config, **overrides)
        self.seen: list[float] = []

    def update(self, step: StepStats) -> list[Finding]:
        self.seen = [*self.seen, step.global_norm][-self.config.window:]
        if step.global_norm > self.config.limit:
            return [self.finding(step, "warning", f"norm {step.global_norm:.3g} above {self.config.limit}",
                                 value=step.global_norm, threshold=self.config.limit)]
        return []

    def state_dict(self) -> dict[str, Any]:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if len(state["seen"]) > self.config.window:
            raise ValueError(f"{len(state['seen'])} steps do not fit a window of {self.config.window}")
        self.seen = list(state["seen"])


def _feed(agg: Aggregator, steps: range, norm: float) -> None:
    """Live reports of run "r" (one rank, one layer of 4 values) whose gradient norm is ``norm``."""
    for i in steps:
        ack = agg.submit({"kind": "step", "run": "r", "rank": 0, "step": i, "count": [4], "sum_sq": [norm**2],
                          "max_abs": [norm], "nonfinite": [0 if np.isfinite(norm) else 4]})
        assert ack.accepted, ack.reason


def _agg() -> Aggregator:
    """A live run "r" with the test detector, five quiet steps (norm 2) in."""
    agg = Aggregator(detector_factory=lambda: {"above": Above()})
    agg.submit({"kind": "layout", "run": "r", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [4],
                "sharded": [False]})
    _feed(agg, range(5), norm=2.0)
    return agg


def test_configure_changes_a_live_run_from_its_next_step_and_carries_state():
    agg = _agg()
    before = agg._runs["r"].detectors["above"]
    summary = agg.configure("r", {"above": {"limit": 1.5}})
    assert summary == {"run": "r", "step": 5, "version": 1, "changed": True,
                       "detectors": {"above": {"fields": {"limit": [10.0, 1.5]}, "state": "carried over"}}}
    after = agg._runs["r"].detectors["above"]
    assert after is not before and after.config.limit == 1.5 and after.seen == before.seen == [2.0] * 5
    assert agg.config_changes("r") == [(5, {"above": {"limit": 1.5}})]
    assert agg.run_view("r").detector_configs["above"].limit == 1.5

    _feed(agg, range(5, 7), norm=2.0)  # the same norm fires under the new limit
    (f,) = agg.findings("r")
    assert (f.first_step, f.last_step, f.occurrences) == (5, 6, 2)
    (logged,) = agg.state_dict()["runs"]["r"]["log"]
    assert logged["config"] == 1  # the configuration version that raised it
    if "config" in Finding.model_fields:
        assert f.config == 1  # type: ignore[attr-defined]

    again = agg.configure("r", {"above": {"limit": 1.5}})  # nothing changes: no new version
    assert again["changed"] is False and again["version"] == 1
    assert again["detectors"]["above"] == {"fields": {}, "state": "unchanged"}


def test_configure_validates_everything_before_changing_anything():
    agg = _agg()
    before = agg._runs["r"].detectors["above"]
    with pytest.raises(ConfigError, match=r"detector 'above': limit: Input should be greater than 0"):
        agg.configure("r", {"above": {"limit": -1}})
    with pytest.raises(ConfigError, match=r"detector 'above': limt: Extra inputs are not permitted"):
        agg.configure("r", {"above": {"limt": 1}})
    with pytest.raises(ConfigError, match=r"unknown detector 'explodin'"):
        agg.configure("r", {"above": {"limit": 2.0}, "explodin": {}})  # the good part is not applied either
    with pytest.raises(KeyError, match="unknown run 'nope'"):
        agg.configure("nope", {"above": {"limit": 2.0}})
    assert agg._runs["r"].detectors["above"] is before and agg.config_changes("r") == []


def test_a_detector_that_cannot_take_its_old_state_starts_fresh_and_says_so():
    agg = _agg()
    summary = agg.configure("r", {"above": {"window": 2}})
    state = summary["detectors"]["above"]["state"]
    assert state.startswith("fresh: its state did not carry over (ValueError: 5 steps do not fit")
    assert agg._runs["r"].detectors["above"].seen == []


def test_disabling_a_detector_clears_its_findings_and_enabling_one_adds_it():
    agg = _agg()
    _feed(agg, range(5, 7), norm=20.0)
    assert [f.active for f in agg.findings("r")] == [True]
    summary = agg.configure("r", {"above": {"enabled": False}, "nonfinite": {"stop_run": True}})
    assert summary["detectors"]["above"] == {"fields": {"enabled": [True, False]}, "state": "removed"}
    assert summary["detectors"]["nonfinite"]["state"] == "added"  # installed, not on this run: now it is
    assert summary["detectors"]["nonfinite"]["fields"] == {"enabled": [False, True], "stop_run": [False, True]}
    assert set(agg.run_view("r").detector_configs) == {"nonfinite"}
    _feed(agg, range(7, 8), norm=20.0)
    assert [f.active for f in agg.findings("r")] == [False]  # nobody raises it any more: cleared
    summary = agg.configure("r", {"above": {"limit": 3.0}})  # set while off the run: kept for when it comes back
    assert summary["detectors"]["above"] == {"fields": {"limit": [10.0, 3.0]},
                                             "state": "not running"}
    summary = agg.configure("r", {"above": {"enabled": True}})
    assert summary["detectors"]["above"] == {"fields": {"enabled": [False, True]}, "state": "added"}
    assert agg.run_view("r").detector_configs["above"].limit == 3.0
    _feed(agg, range(8, 9), norm=float("nan"))
    assert agg.should_stop("r") is not None and agg.findings("r")[-1].detector == "nonfinite"
    assert [version for _, version in _versions(agg)] == [0, 3]  # above before the changes, nonfinite after 3


def _versions(agg: Aggregator) -> list[tuple[str, int]]:
    return [(d["detector"], d["config"]) for d in agg.state_dict()["runs"]["r"]["log"]]


def test_configuration_changes_survive_a_snapshot_and_restart():
    agg = _agg()
    agg.configure("r", {"above": {"limit": 1.5}})
    _feed(agg, range(5, 7), norm=2.0)
    state = agg.state_dict()
    assert state["runs"]["r"]["config_changes"] == [[5, {"above": {"limit": 1.5}}]]
    restored = Aggregator(detector_factory=lambda: {"above": Above()})
    restored.load_state_dict(state)
    assert restored.config_changes("r") == [(5, {"above": {"limit": 1.5}})]
    det = restored._runs["r"].detectors["above"]
    assert det.config.limit == 1.5 and det.seen == [2.0] * 5
    assert restored.state_dict()["runs"]["r"]["log"][0]["config"] == 1
    _feed(restored, range(7, 9), norm=2.0)  # resumes: the same finding, still active, seen again
    (f,) = restored.findings("r")
    assert (f.first_step, f.last_step, f.occurrences) == (5, 8, 4)


def test_configure_with_registry_detectors_carries_the_exploding_history():
    agg = Aggregator(AggregatorConfig(), {"exploding": {"z_threshold": 7.0}})
    agg.replay("r", [make_step(step=i, run="r", sum_sq=[1.0 + 0.01 * i]) for i in range(30)])
    old = agg._runs["r"].detectors["exploding"].state_dict()
    summary = agg.configure("r", {"exploding": {"z_threshold": 8.0, "max_norm": 100.0}})
    cap = registry.available()["exploding"].Config.model_fields["max_norm"].default
    assert summary["detectors"]["exploding"] == {
        "fields": {"z_threshold": [7.0, 8.0], "max_norm": [cap, 100.0]}, "state": "carried over"}
    assert agg._runs["r"].detectors["exploding"].state_dict()["history"] == old["history"]


def test_replay_refuses_an_existing_run_and_goes_on_through_a_restart():
    agg = _agg()
    with pytest.raises(ValueError, match="run 'r' exists"):
        agg.replay("r", [make_step(step=9, run="r", sum_sq=[1.0])])
    # a restarted attempt's history holds its steps after the first attempt's: 4, then 3 again
    agg.replay("other", [make_step(step=s, run="other", sum_sq=[1.0]) for s in (4, 3)])
    assert agg.latest("other").step == 3 and len(agg.history("other")) == 2


@pytest.mark.ray
@pytest.mark.slow
def test_configure_a_live_run_through_the_service(service, capsys):
    """The round trip: `gfservice configure` -> Client.configure -> the actor -> Aggregator.configure; the
    service's ConfigError and unknown-run KeyError arrive as themselves, not wrapped by Ray."""
    run = "configure-live"
    service.submit([{"kind": "layout", "run": run, "rank": 0, "world_size": 1, "layers": ["w"], "numel": [4],
                     "sharded": [False]},
                    *({"kind": "step", "run": run, "rank": 0, "step": i, "count": [4], "sum_sq": [1.0],
                       "max_abs": [0.5], "nonfinite": [0]} for i in range(3))])
    assert main(["configure", run, "--set", "exploding.z_threshold=8", "--set", "exploding.max_norm=100"]) == 0
    out = capsys.readouterr().out
    assert f"run {run}: detector configuration 1 applies from step 3" in out
    fields = registry.available()["exploding"].Config.model_fields
    z, cap = fields["z_threshold"].default, fields["max_norm"].default
    assert f"exploding  z_threshold {z!r} -> 8.0, max_norm {cap!r} -> 100.0  (state carried over)" in out
    with pytest.raises(ConfigError, match="detector 'exploding': z_treshold: Extra inputs are not permitted"):
        service.configure(run, {"exploding": {"z_treshold": 8}})
    with pytest.raises(KeyError, match="unknown run 'nobody'"):
        service.configure("nobody", {"exploding": {"z_threshold": 8}})
    assert main(["configure", "nobody", "--set", "exploding.z_threshold=8"]) == 1
    assert "unknown run 'nobody'" in capsys.readouterr().err
