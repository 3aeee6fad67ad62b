"""The README's examples run as written: the detector plugin example and the configuration file."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gfservice.config import load_settings
from gfservice.testing import check_detector, make_step, replay

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _block(lang: str, marker: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)
    (found,) = [b for b in blocks if marker in b]
    return found


def test_the_readme_plugin_example_works_with_the_kit():
    ns: dict = {}
    exec(compile(_block("python", "class DeadLayers"), "README.md", "exec"), ns)
    dead_layers = ns["DeadLayers"]
    steps = [make_step(step=i, sum_sq=[1.0, 1.0, 0.0], count=100, sum_abs=[5.0, 5.0, 0.0], zeros=[0, 0, 100])
             for i in range(6)]
    (first, *_) = replay(dead_layers(), steps)
    assert first.step == 0 and first.layers == ["layer2"] and "receive no gradient" in first.message
    assert replay(dead_layers(), [make_step(sum_sq=[1.0])]) == []  # not a deep step: not judged
    check_detector(dead_layers, steps)


def test_the_readme_configuration_file_is_valid(tmp_path):
    path = tmp_path / "gfservice.toml"
    path.write_text(_block("toml", "[detectors.exploding]"))
    settings = load_settings(path)
    assert settings.detectors["exploding"]["max_norm"] == 100.0
    assert settings.service.metrics_port == 8000
    assert np.isclose(settings.aggregator.merge_timeout_s, 30)
