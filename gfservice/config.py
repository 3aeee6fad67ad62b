"""The configuration file (TOML or YAML): which detectors run with which fields, and aggregator limits.

```toml
[detectors.exploding]
z_threshold = 8.0
[detectors.vanishing]
enabled = false
[aggregator]
history = 500
```

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "gf.toml"
>>> _ = p.write_text("[detectors.exploding]\\nz_threshold = 8.0\\n")
>>> load_settings(p).detectors
{'exploding': {'z_threshold': 8.0}}
>>> _ = p.write_text("[detectors.exploding]\\nz_treshold = 8.0\\n")
>>> load_settings(p)
Traceback (most recent call last):
...
gfservice.registry.ConfigError: ...gf.toml: detector 'exploding': z_treshold: Extra inputs are not permitted
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gfservice import registry
from gfservice.registry import ConfigError
from gfservice.service.aggregator import AggregatorConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class Settings(BaseModel):
    """Everything a configuration file can set. Sections other tools own are kept in ``extra``."""

    model_config = ConfigDict(extra="forbid")

    detectors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)
    service: dict[str, Any] = Field(default_factory=dict)


def read_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML (``.toml``) or YAML (``.yaml``/``.yml``) file into a dict."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such configuration file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        else:
            raise ConfigError(f"{path}: use a .toml, .yaml or .yml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table/mapping")
    return data


def load_settings(path: str | Path | None = None, data: dict[str, Any] | None = None) -> Settings:
    """Read and validate a configuration file (or an already parsed dict)."""
    where = str(path) if path else "settings"
    raw = read_file(path) if path else (data or {})
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        e = exc.errors()[0]
        raise ConfigError(f"{where}: {'.'.join(map(str, e['loc']))}: {e['msg']}") from None
    try:
        registry.validate(settings.detectors)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return settings
