"""The files gfservice ships: dashboards, alert rules, Grafana provisioning and runbooks, as package data.

They live in the repository's user-facing folders (``dashboards/``, ``deploy/prometheus/rules/``,
``deploy/grafana/provisioning/``, ``docs/runbooks/``). ``[tool.setuptools.package-dir]`` in ``pyproject.toml``
maps each folder onto a data-only package, so a wheel carries them as ``gfservice/assets/<group>/``. Read them
only through this module: it finds them with :mod:`importlib.resources`, never relative to the working
directory, so the commands that need them work from an installed wheel in any directory. In an editable
install (``pip install -e .``) the folders stay in the checkout and are read there: setuptools' editable finder
cannot import data-only packages that have no ``__init__.py`` below ``gfservice``, so :data:`LOCATIONS` (which
mirrors ``package-dir``; a test keeps the two equal) says where each group lies in a checkout.

Each accessor returns a :class:`~importlib.resources.abc.Traversable` (``read_text()``, ``name``, ``is_file()``;
a :class:`pathlib.Path` in an ordinary installation); :func:`importlib.resources.as_file` gives a real path
where a tool needs one.

>>> sorted(dashboards())
['fleet', 'run-health', 'service']
>>> rules_file().name, grafana_alert_rules().name
('gfservice.rules.yml', 'gfservice-alerts.yml')
>>> runbook("GradflowServiceDown").startswith("# ")
True
"""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sys

    if sys.version_info >= (3, 11):
        from importlib.resources.abc import Traversable
    else:
        from importlib.abc import Traversable

__all__ = [
    "LOCATIONS",
    "dashboard",
    "dashboards",
    "grafana_alert_rules",
    "grafana_dashboard_provider",
    "grafana_datasource",
    "grafana_provisioning",
    "rules_file",
    "runbook",
    "runbook_file",
    "runbooks",
]

#: Group -> its folder in a checkout; an installed gfservice holds the group as ``gfservice/assets/<group>/``
#: (the package ``gfservice.assets.<group>`` of ``[tool.setuptools.package-dir]``).
LOCATIONS = {
    "dashboards": "dashboards",
    "rules": "deploy/prometheus/rules",
    "grafana": "deploy/grafana/provisioning",
    "runbooks": "docs/runbooks",
}
PROMETHEUS_RULES_NAME = "gfservice.rules.yml"
GRAFANA_ALERTS_NAME = "gfservice-alerts.yml"


def _dir(group: str) -> Traversable:
    """The directory of ``group``: inside the installed package, else (editable install) in the checkout."""
    installed = files("gfservice").joinpath("assets").joinpath(group)
    if installed.is_dir():
        return installed
    checkout = Path(__file__).resolve().parents[2]  # gfservice/observability/assets.py -> the checkout
    here = checkout.joinpath(*LOCATIONS[group].split("/"))
    if (checkout / "pyproject.toml").is_file() and here.is_dir():
        return here
    raise FileNotFoundError(f"gfservice's package data ({group}: gfservice/assets/{group}/) is not installed: "
                            "reinstall gfservice (pip install --force-reinstall gfservice, or pip install -e . "
                            "in a checkout)")


def _file(group: str, *parts: str) -> Traversable:
    node = _dir(group)
    for part in parts:  # one name at a time: Python 3.10's MultiplexedPath joins single names only
        node = node.joinpath(part)
    if not node.is_file():
        raise FileNotFoundError(f"{'/'.join(parts)} is missing from gfservice's package data ({group}): "
                                "reinstall gfservice")
    return node


def _by_suffix(group: str, suffix: str) -> dict[str, Traversable]:
    found = {f.name.removesuffix(suffix): f for f in _dir(group).iterdir() if f.name.endswith(suffix) and f.is_file()}
    return dict(sorted(found.items()))


# ---- dashboards ----------------------------------------------------------------------------------------------
def dashboards() -> dict[str, Traversable]:
    """The generated Grafana dashboards, ``key -> <key>.json`` (``run-health``, ``fleet``, ``service``)."""
    return _by_suffix("dashboards", ".json")


def dashboard(key: str) -> dict[str, Any]:
    """The dashboard ``key`` as the JSON-ready dict Grafana takes."""
    return json.loads(_file("dashboards", f"{key}.json").read_text(encoding="utf-8"))


# ---- alert rules ---------------------------------------------------------------------------------------------
def rules_file() -> Traversable:
    """The Prometheus rule file (``deploy/prometheus/rules/gfservice.rules.yml``)."""
    return _file("rules", PROMETHEUS_RULES_NAME)


def grafana_alert_rules() -> Traversable:
    """The Grafana-managed alert rules, as file provisioning (``.../provisioning/alerting/gfservice-alerts.yml``)."""
    return _file("grafana", "alerting", GRAFANA_ALERTS_NAME)


# ---- Grafana provisioning ------------------------------------------------------------------------------------
def grafana_provisioning() -> Traversable:
    """Grafana's provisioning directory (``alerting/``, ``dashboards/``, ``datasources/``)."""
    return _dir("grafana")


def grafana_datasource() -> Traversable:
    """The Prometheus data source (uid ``gfservice-prometheus``) as file provisioning."""
    return _file("grafana", "datasources", "gfservice.yml")


def grafana_dashboard_provider() -> Traversable:
    """The dashboard provider that loads the dashboards into the folder ``gfservice``."""
    return _file("grafana", "dashboards", "gfservice.yml")


# ---- runbooks ------------------------------------------------------------------------------------------------
def runbooks() -> dict[str, Traversable]:
    """Every runbook, ``alert name -> <name>.md``."""
    return _by_suffix("runbooks", ".md")


def runbook_file(name: str) -> Traversable:
    """The runbook of the alert ``name`` (e.g. ``GradflowServiceDown``)."""
    return _file("runbooks", f"{name.removesuffix('.md')}.md")


def runbook(name: str) -> str:
    """The Markdown text of the runbook of the alert ``name``."""
    return runbook_file(name).read_text(encoding="utf-8")
