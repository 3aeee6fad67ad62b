"""Detector discovery, the configuration file, the plugin author's kit and ``gfservice detectors``."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from models import mlp, train

import gfservice
from gfservice.api import Detector, DetectorConfig, StepStats
from gfservice.config import load_settings
from gfservice.registry import ConfigError, available
from gfservice.service.aggregator import Aggregator
from gfservice.testing import check_detector, make_step, replay

BUILTINS = sorted(n for n, c in available().items() if c.__module__.startswith("gfservice_detectors."))


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---- the configuration file ------------------------------------------------------------------------------
CONFIGS = {
    "toml": """
        [detectors.exploding]
        z_threshold = 8.0
        max_norm = 100.0
        [detectors.vanishing]
        enabled = false
        [aggregator]
        history = 5
        """,
    "yaml": """
        detectors:
          exploding:
            z_threshold: 8.0
            max_norm: 100.0
          vanishing:
            enabled: false
        aggregator:
          history: 5
        """,
}


@pytest.mark.parametrize("kind", ["toml", "yaml"])
def test_config_file_picks_detectors_and_overrides_fields(tmp_path, kind):
    path = _write(tmp_path, f"gfservice.{kind}", CONFIGS[kind])
    settings = load_settings(path)
    assert settings.detectors == {"exploding": {"z_threshold": 8.0, "max_norm": 100.0},
                                  "vanishing": {"enabled": False}}
    assert settings.aggregator.history == 5

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gfservice.monitor(model, opt, run="cfg", service=None, config=path)
    agg = mon.transport.aggregator
    assert agg.config.history == 5
    dets = agg.run_view("cfg").detector_configs
    assert "vanishing" not in dets and {"exploding", "nonfinite"} <= set(dets)
    assert dets["exploding"].z_threshold == 8.0 and dets["exploding"].max_norm == 100.0
    for _ in range(7):
        (model(torch.randn(8, 4)) * 1e4).pow(2).mean().backward()  # a gradient norm far above the cap of 100
        opt.step()
        mon.step()
        opt.zero_grad()
    mon.close()
    assert len(agg.history("cfg")) == 5
    cap = [f for f in mon.findings if f.key == "cap"]
    assert cap and cap[0].first_step == 0 and cap[0].threshold == 100.0 and cap[0].severity.value == "critical"


def test_monitor_detectors_argument_adds_to_the_file(tmp_path):
    path = _write(tmp_path, "gf.toml", CONFIGS["toml"])
    mon = gfservice.monitor(torch.nn.Linear(2, 1), None, run="cfg2", service=None, config=path,
                            detectors={"nonfinite": {"check_loss": False}})
    dets = mon.transport.aggregator.run_view("cfg2").detector_configs
    assert dets["nonfinite"].check_loss is False and dets["exploding"].max_norm == 100.0
    mon.close()


BAD_CONFIGS = [
    ("gf.toml", "[detectors.explodin]\nz_threshold = 8.0\n",
     r"unknown detector 'explodin'; installed: .*exploding, .*nonfinite"),
    ("gf.yaml", "detectors:\n  vanishng: {}\n", r"unknown detector 'vanishng'"),
    ("gf.toml", "[detectors.exploding]\nz_treshold = 8.0\n", r"detector 'exploding': z_treshold: Extra inputs"),
    ("gf.yaml", "detectors:\n  vanishing:\n    orderz: 4\n", r"detector 'vanishing': orderz: Extra inputs"),
    ("gf.toml", "[detectors.exploding]\nz_threshold = \"high\"\n", r"detector 'exploding': z_threshold: "),
    ("gf.toml", "[aggregator]\nhistroy = 5\n", r"aggregator\.histroy: Extra inputs"),
    ("gf.toml", "[aggregator]\nhistory = 0\n", r"aggregator\.history: Input should be greater than or equal to 1"),
    ("gf.toml", "[detectorz.exploding]\n", r"detectorz: Extra inputs"),
    ("gf.toml", "[detectors.exploding\n", r"gf\.toml: "),
    ("gf.yaml", "detectors: [1, 2\n", r"gf\.yaml: "),
    ("gf.yaml", "- just\n- a list\n", r"top level must be a table/mapping"),
    ("gf.ini", "[detectors]\n", r"use a \.toml, \.yaml or \.yml file"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD_CONFIGS, ids=[m for _, _, m in BAD_CONFIGS])
def test_bad_config_is_an_error_that_names_the_problem(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_settings(path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match=message):  # the monitor refuses it up front, before training
        gfservice.monitor(torch.nn.Linear(2, 1), None, run="bad", service=None, config=path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_settings(tmp_path / "nope.toml")


def test_unknown_detector_in_code_is_an_error_too():
    with pytest.raises(ConfigError, match="unknown detector 'nope'"):
        Aggregator(detector_settings={"nope": {}})
    with pytest.raises(ConfigError, match="detector 'nonfinite': check_los: Extra inputs"):
        gfservice.monitor(torch.nn.Linear(2, 1), service=None, detectors={"nonfinite": {"check_los": True}})


# ---- discovery ---------------------------------------------------------------------------------------------
def _broken_plugins(root) -> None:
    """An installed-looking distribution whose two entry points are a module that raises on import and a
    class that is not a Detector."""
    dist = root / "broken_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[gfservice.detectors]\n"
        "broken = broken_plugin_mod:Broken\n"
        "not_a_detector = not_a_detector_mod:Thing\n"
    )
    (root / "broken_plugin_mod.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    (root / "not_a_detector_mod.py").write_text("class Thing:\n    pass\n")


def test_a_plugin_that_fails_to_load_is_skipped_with_a_warning(tmp_path, monkeypatch, fresh_registry):
    _broken_plugins(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh_registry.available.cache_clear()
    with pytest.warns(RuntimeWarning) as caught:
        found = fresh_registry.available()
    messages = [str(w.message) for w in caught]
    assert any("skipping detector plugin 'broken'" in m and "broken on purpose" in m for m in messages), messages
    assert any("skipping detector plugin 'not_a_detector'" in m and "not a gfservice.api.Detector" in m
               for m in messages), messages
    assert "broken" not in found and "not_a_detector" not in found
    assert set(BUILTINS) <= set(found)
    agg = Aggregator()  # the service still starts, with every working detector
    assert agg.submit({"kind": "layout", "run": "r", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [1],
                       "sharded": [False]}).accepted
    assert set(BUILTINS) <= set(agg.run_view("r").detector_configs)


# ---- the plugin author's kit -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded_runs() -> list[list[StepStats]]:
    """Merged steps of two real training runs, 40 steps each (detectors see them as the service would).

    A: a 20-layer sigmoid MLP (vanishing from the start), rank 1 of a pretend world of two missing in steps
    15-25 (a stalled worker), a NaN batch at step 30. B: a 20-layer ReLU MLP whose learning rate jumps from
    0.05 to 10 at step 30 (a spike, then NaN).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs = []
    for kind in ("A", "B"):
        model = mlp(20, width=32, activation="sigmoid" if kind == "A" else "relu",
                    init="uniform" if kind == "A" else "he")
        opt = torch.optim.SGD(model.parameters(), lr=0.1 if kind == "A" else 0.05)
        mon = gfservice.monitor(model, opt, run=f"rec-{kind}", service=None, deep_every=10)

        def event(step, x, y, kind=kind, opt=opt):
            if step != 30:
                return None
            if kind == "B":
                for group in opt.param_groups:
                    group["lr"] = 10.0
                return None
            return x * float("nan"), y

        train(model, opt, 40, monitor=mon, on_step=event)
        mon.close()
        steps = mon.transport.aggregator.history(f"rec-{kind}")
        if kind == "A":
            steps = [dataclasses.replace(s, missing_ranks=(1,) if 15 <= s.step <= 25 else (),
                                         rank_norm=np.array([s.global_norm, np.nan if 15 <= s.step <= 25 else 1.0]),
                                         rank_nonfinite=np.array([False, False]))
                     for s in steps]
        runs.append(steps)
    torch.set_num_threads(threads)
    return runs


@pytest.mark.parametrize("name", BUILTINS)
def test_check_detector_passes_for_each_builtin_detector(name, recorded_runs):
    for steps in recorded_runs:
        check_detector(available()[name], steps)


#: The built-ins that the two recorded runs exercise; the others fire on the synthetic and real runs of their own
#: test files (tests/test_detectors_*.py), whose check_detector sequences fire after the restore point.
RECORDED = ("exploding", "nonfinite", "stalled_rank", "vanishing")


def test_every_recorded_detector_fires_after_the_restore_point(recorded_runs):
    """check_detector restores a detector half-way: each must fire in a second half, so that the comparison with
    the original is not vacuous."""
    silent = []
    for name in RECORDED:
        cls = available()[name]
        fired = []
        for steps in recorded_runs:
            det = cls()
            fired += [f for f in replay(det, steps) if f.step >= len(steps) // 2]
        if not fired:
            silent.append(name)
    assert not silent, f"no finding after the restore point from: {silent}"


def test_every_builtin_detector_has_a_contract_test():
    sources = "".join(p.read_text() for p in Path(__file__).parent.glob("test_detectors_*.py"))
    missing = [name for name in BUILTINS
               if f"check_detector({available()[name].__name__}," not in sources and name not in RECORDED]
    assert not missing, f"built-in detectors without a check_detector test in tests/test_detectors_*.py: {missing}"


class Forgetful(Detector):
    """Counts steps with a high loss but forgets the count on restore (a bug the kit must catch)."""

    name = "forgetful"

    class Config(DetectorConfig):
        patience: int = 3

    def __init__(self, config=None, **kw):
        super().__init__(config, **kw)
        self.streak = 0

    def update(self, step):
        self.streak = self.streak + 1 if (step.loss or 0) > 1 else 0
        return [self.finding(step, "warning", "high loss")] if self.streak >= self.config.patience else []


class NoDoc(Detector):
    name = "nodoc"

    def update(self, step):
        return []


class WrongName(Detector):
    """Reports findings under another detector's name."""

    name = "wrong_name"

    def update(self, step):
        return [self.finding(step, "info", "x").model_copy(update={"detector": "someone_else"})]


class ReturnsTuple(Detector):
    """Returns a tuple instead of a list."""

    name = "returns_tuple"

    def update(self, step):
        return ()


@pytest.mark.parametrize(
    ("cls", "message"),
    [(Forgetful, "restored from state_dict"), (NoDoc, "add a docstring"), (WrongName, "bad finding"),
     (ReturnsTuple, "update returned tuple")],
)
def test_check_detector_catches_broken_plugins(cls, message):
    steps = [make_step(step=i, sum_sq=[1.0], loss=2.0) for i in range(6)]
    with pytest.raises(AssertionError, match=message):
        check_detector(cls, steps)


# ---- the command line --------------------------------------------------------------------------------------
def test_cli_lists_every_detector_with_fields_defaults_and_summary():
    proc = subprocess.run([sys.executable, "-m", "gfservice", "detectors"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    installed = available()
    assert set(BUILTINS) <= set(installed)
    for name, cls in installed.items():
        block = re.search(rf"^{re.escape(name)}\b.*?(?=^\S|\Z)", out, flags=re.M | re.S)
        assert block, f"{name} is not listed:\n{out}"
        text = block.group(0)
        assert cls.summary() in text, f"{name}: summary missing:\n{text}"
        for field, info in cls.Config.model_fields.items():
            line = next((ln for ln in text.splitlines() if re.match(rf"\s+{field}\s", ln)), None)
            assert line is not None, f"{name}: field {field} missing:\n{text}"
            assert repr(info.default) in line, f"{name}.{field}: default {info.default!r} missing in {line!r}"


def test_a_bad_detector_field_fails_at_load_naming_detector_and_field(tmp_path):
    path = _write(tmp_path, "gf.toml", "[detectors.stalled_rank]\nwindow = -1\n")
    with pytest.raises(ConfigError, match=r"gf\.toml: detector 'stalled_rank': window: Input should be greater"):
        load_settings(path)


def test_a_bad_exporter_field_fails_at_load_not_in_the_actor(tmp_path):
    path = _write(tmp_path, "gf.toml", "[service.exporter]\ncertfile = '/x.pem'\n")
    with pytest.raises(ConfigError, match=r"service\.exporter: certfile and keyfile go together"):
        load_settings(path)


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    path = _write(tmp_path, "gf.toml", "[service]\nmetrics_port = 8000\n[detectors.exploding]\nz_threshold = 7.0\n")
    monkeypatch.setenv("GFSERVICE_SERVICE__METRICS_PORT", "9100")
    monkeypatch.setenv("GFSERVICE_DETECTORS__EXPLODING__Z_THRESHOLD", "9")
    settings = load_settings(path)
    assert settings.service.metrics_port == 9100
    assert settings.detectors["exploding"]["z_threshold"] == "9"  # validated as 9.0 when the detector is built
    monkeypatch.setenv("GFSERVICE_DETECTORS__EXPLODING__Z_TRESHOLD", "9")
    with pytest.raises(ConfigError, match="z_treshold"):
        load_settings(path)
