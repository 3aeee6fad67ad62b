"""The documentation site: the generated reference pages are complete, every page is in the navigation, every
alert has its runbook page, and ``mkdocs build --strict`` passes (broken links and references fail it).

The pages come from ``docs/gen_reference.py``; each test checks them against the code by a second route (the
settings model's fields, the exporter's families, the parsers' subcommands and options, the installed detectors,
the alert definitions, the ``GFSERVICE_*`` names in the source), so a setting, metric, command or detector added
without its page fails here.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from pydantic import BaseModel

from gfservice import registry
from gfservice.cli.main import build_parser
from gfservice.config import Settings
from gfservice.observability.alerts import ALERTS
from gfservice.observability.exporter import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load("gen_reference")


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("docs")
    gen.generate(out)
    return {rel: (out / rel).read_text() for rel in gen.PAGES}


def _leaves(model: type[BaseModel], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            out += _leaves(info.annotation, (*path, name))
        else:
            out.append((*path, name))
    return out


def test_every_setting_and_variable_is_in_the_configuration_page(pages):
    page = pages["reference/configuration.md"]
    leaves = _leaves(Settings)
    assert len(leaves) > 30
    for leaf in leaves:
        section = "[" + ".".join(leaf[:-1]) + "]" if leaf[:-1] else "(top level)"
        assert f"## `{section}`" in page, section
        assert f"| `{leaf[-1]}` |" in page and f"`GFSERVICE_{'__'.join(leaf).upper()}`" in page, leaf
    assert all(row["doc"] for row in gen.settings_rows()), "every setting has its meaning (a #: comment)"
    # every GFSERVICE_* name the code reads or mentions is documented
    source = "\n".join(p.read_text() for p in (ROOT / "gfservice").rglob("*.py"))
    named = set(re.findall(r'"(GFSERVICE_[A-Z0-9_]*[A-Z0-9])"', source)) | set(
        re.findall(r"environ(?:\.get)?\(?\[?\"(GFSERVICE_[A-Z0-9_]+)", source))
    assert {"GFSERVICE_TOKEN", "GFSERVICE_RUN", "GFSERVICE_PEER_ADDR"} <= named
    missing = sorted(v for v in named if f"`{v}`" not in page)
    assert not missing, f"GFSERVICE_* variables missing from the configuration page: {missing}"


def test_every_metric_family_and_label_is_in_the_metrics_page(pages):
    page = pages["reference/metrics.md"]
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(gradflow_\w+)` \|.*$", page, flags=re.M)}
    for name, (kind, _doc, labels) in FAMILIES.items():
        exposed = f"gradflow_{name}" + ("_total" if kind == "counter" else "")
        assert exposed in rows, exposed
        assert f"| {kind} |" in rows[exposed]
        for label in labels:
            assert f"`{label}`" in rows[exposed], (exposed, label)
    assert len(rows) == len(FAMILIES)


def _walk(parser: argparse.ArgumentParser, prefix: str) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out += _walk(sub, f"{prefix} {name}")
    return out


def test_every_command_and_option_is_in_the_cli_page(pages):
    page = pages["reference/cli.md"]
    commands = _walk(build_parser(), "gfservice")
    assert len(commands) > 10
    for name, parser in commands:
        heading = f"\n## `{name}`\n"
        assert heading in page, name
        section = page.split(heading, 1)[1].split("\n## ", 1)[0]
        for action in parser._actions:
            for option in action.option_strings:
                assert option in section, (name, option)
    for expected in ("gfservice serve", "gfservice demo", "gfservice alerts render", "gfservice detectors"):
        assert f"## `{expected}`" in page


def test_every_detector_and_field_is_in_the_detectors_page(pages):
    page = pages["reference/detectors.md"]
    available = registry.available()
    assert len(available) >= 13
    for name, cls in available.items():
        heading = f"\n## `{name}`\n"
        assert heading in page, name
        section = page.split(heading, 1)[1].split("\n## ", 1)[0]
        for field in cls.Config.model_fields:
            assert f"| `{field}` |" in section, (name, field)
    command = "from gfservice.cli.main import main; main(['detectors'])"
    listing = subprocess.run([sys.executable, "-c", command], capture_output=True, text=True, check=True,
                             cwd=ROOT).stdout
    assert listing.strip() in page, "the page shows what `gfservice detectors` prints"


def test_every_alert_has_its_meaning_and_runbook_page(pages):
    page = pages["oncall/alerts.md"]
    runbooks = {p.stem for p in (DOCS / "runbooks").glob("*.md")}
    assert runbooks == {a.name for a in ALERTS}, "one runbook page per alert, and no other"
    for alert in ALERTS:
        assert f"\n### {alert.name}\n" in page and f"(../runbooks/{alert.name}.md)" in page
        assert alert.runbook_url().endswith(f"docs/runbooks/{alert.name}.md"), "runbook_url links the page"


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for value in nav.values() for p in _nav_pages(value)]
    return []


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.Loader)  # !!python/name tags
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav))
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")} | set(gen.PAGES)
    assert set(nav) == on_disk, (f"not in the nav: {sorted(on_disk - set(nav))}; "
                                 f"in the nav but missing: {sorted(set(nav) - on_disk)}")


def test_doctests_become_code_blocks():
    fences = _load("griffe_doctest")
    assert fences.fence_doctests("Text.\n\n>>> [1]\n[1]\n\nMore.") == "Text.\n\n```pycon\n>>> [1]\n[1]\n```\n\nMore."


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                          str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"}, check=False)
    assert res.returncode == 0, f"mkdocs build --strict failed:\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / "site/reference/configuration/index.html").exists()
    api = (tmp_path / "site/plugins/api/index.html").read_text()
    assert "check_detector" in api and "DetectorConfig" in api
