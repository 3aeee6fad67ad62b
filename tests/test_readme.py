"""The README is what a first visit needs, and the documentation's examples run as written: the detector plugin
tutorial's example (docs/plugins/tutorial.md) and the configuration file (docs/howto/detectors.md), both in the
README until the documentation site took them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from gfservice.config import load_settings
from gfservice.testing import check_detector, make_step, replay

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PLUGIN_TUTORIAL = ROOT / "docs/plugins/tutorial.md"
DETECTORS_HOWTO = ROOT / "docs/howto/detectors.md"


def _block(lang: str, marker: str, page: Path) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", page.read_text(), flags=re.S)
    (found,) = [b for b in blocks if marker in b]
    return found


def test_the_readme_is_short_and_links_into_the_docs():
    assert len(README.splitlines()) <= 150, "the README is for a first visit: the rest goes in docs/"
    for section in ("## The two commands", "## The two lines in a training loop", "## Documentation"):
        assert section in README
    assert "./scripts/demo.sh" in README and "./scripts/test.sh" in README
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]*|SECURITY\.md)\)", README)
    assert len(links) >= 15
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_tutorial_plugin_example_works_with_the_kit():
    ns: dict = {}
    exec(compile(_block("python", "class DeadLayers", PLUGIN_TUTORIAL), str(PLUGIN_TUTORIAL), "exec"), ns)
    dead_layers = ns["DeadLayers"]
    steps = [make_step(step=i, sum_sq=[1.0, 1.0, 0.0], count=100, sum_abs=[5.0, 5.0, 0.0], zeros=[0, 0, 100])
             for i in range(6)]
    (first, *_) = replay(dead_layers(), steps)
    assert first.step == 0 and first.layers == ["layer2"] and "receive no gradient" in first.message
    assert replay(dead_layers(), [make_step(sum_sq=[1.0])]) == []  # not a deep step: not judged
    check_detector(dead_layers, steps)


def test_the_documented_configuration_file_is_valid(tmp_path):
    path = tmp_path / "gfservice.toml"
    path.write_text(_block("toml", "[detectors.exploding]", DETECTORS_HOWTO))
    settings = load_settings(path)
    assert settings.detectors["exploding"]["max_norm"] == 100.0
    assert settings.service.metrics_port == 8000
    assert np.isclose(settings.aggregator.merge_timeout_s, 30)
