"""Detector discovery through the ``gfservice.detectors`` entry-point group, and detector selection.

Built-in and third-party detectors are found the same way. A plugin that fails to import is skipped
with a warning; an unknown detector name or configuration field is an error that names it.

>>> {"exploding", "nonfinite", "vanishing", "stalled_rank"} <= set(available())
True
>>> build({"exploding": {"z_threshold": 8}})["exploding"].config.z_threshold
8.0
>>> build({"explodin": {}})
Traceback (most recent call last):
...
gfservice.errors.ConfigError: unknown detector 'explodin'; installed: ..., exploding, ...
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from functools import cache
from importlib.metadata import entry_points
from typing import Any

from pydantic import ValidationError

from gfservice.api import Detector
from gfservice.errors import ConfigError

__all__ = ["GROUP", "ConfigError", "available", "build", "describe", "validate"]

log = logging.getLogger(__name__)

GROUP = "gfservice.detectors"


@cache
def available() -> dict[str, type[Detector]]:
    """Every installed detector class by name; plugins that fail to load are skipped with a warning."""
    found: dict[str, type[Detector]] = {}
    for ep in entry_points(group=GROUP):
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Detector)):
                raise TypeError(f"{ep.value} is not a gfservice.api.Detector subclass")
        except Exception as exc:  # a broken plugin must not take the service down
            warnings.warn(f"skipping detector plugin {ep.name!r}: {exc}", RuntimeWarning, stacklevel=2)
            continue
        name = cls.name or ep.name
        if name in found and found[name] is not cls:
            warnings.warn(f"detector {name!r} is registered twice; keeping {found[name].__module__}",
                          RuntimeWarning, stacklevel=2)
            continue
        found[name] = cls
    return dict(sorted(found.items()))


def validate(settings: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Check detector settings (name -> field overrides) against the installed detectors.

    Raises :class:`ConfigError` naming the unknown detector or the bad field.
    """
    classes = available()
    out: dict[str, dict[str, Any]] = {}
    for name, fields in (settings or {}).items():
        if name not in classes:
            raise ConfigError(f"unknown detector {name!r}; installed: {', '.join(classes)}")
        try:
            classes[name](dict(fields or {}))  # built once: a bad field fails here, not in the service
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"detector {name!r}: {problems}") from None
        out[name] = dict(fields or {})
    return out


def build(settings: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Detector]:
    """A fresh, enabled instance of every installed detector, with ``settings`` applied."""
    settings = validate(settings)
    detectors: dict[str, Detector] = {}
    for name, cls in available().items():
        det = cls(settings.get(name))
        if det.config.enabled:
            detectors[name] = det
    return detectors


def describe() -> list[dict[str, Any]]:
    """Name, summary and configuration fields (with defaults) of every installed detector."""
    rows = []
    for name, cls in available().items():
        fields = {
            f: (info.default, info.annotation)
            for f, info in cls.Config.model_fields.items()
        }
        rows.append({"name": name, "summary": cls.summary(), "module": cls.__module__, "fields": fields})
    return rows
