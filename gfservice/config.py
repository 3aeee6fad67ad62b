"""One settings model: which detectors run with which fields, aggregator limits, the service and its exporter.

Read from a TOML or YAML file, with ``GFSERVICE_*`` environment variables on top (``__`` separates nested
keys: ``GFSERVICE_SERVICE__METRICS_PORT=9000``, ``GFSERVICE_DETECTORS__EXPLODING__Z_THRESHOLD=8``). The whole
file is validated at load: every configured detector is built once, so a bad field is a :class:`ConfigError`
that names the detector and the field before anything starts.

```toml
[detectors.exploding]
z_threshold = 8.0
[detectors.vanishing]
enabled = false
[aggregator]
history = 500
[service.exporter]
max_layer_series = 64
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
gfservice.errors.ConfigError: ...gf.toml: detector 'exploding': z_treshold: Extra inputs are not permitted
>>> _ = p.write_text("[service.exporter]\\ndepth_buckets = 0\\n")
>>> load_settings(p)
Traceback (most recent call last):
...
gfservice.errors.ConfigError: ...gf.toml: service.exporter.depth_buckets: Input should be greater than or equal to 1
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from gfservice import registry
from gfservice.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["AggregatorConfig", "ConfigError", "ExporterConfig", "ServiceConfig", "Settings", "load_settings"]

DEFAULT_NAME = os.environ.get("GFSERVICE_NAME", "gfservice")
DEFAULT_NAMESPACE = os.environ.get("GFSERVICE_NAMESPACE", "gfservice")


class AggregatorConfig(BaseModel):
    """Limits and behaviour of the aggregator; every field has a default that suits most jobs."""

    model_config = ConfigDict(extra="forbid")

    #: Merged steps kept per run (the history behind ``latest`` and reports).
    history: int = Field(1000, ge=1)
    #: Findings kept per run, newest last.
    findings_history: int = Field(1000, ge=1)
    #: Layers allowed per run; a layout with more is rejected as oversized.
    max_layers: int = Field(100_000, ge=1)
    #: Runs tracked at once; beyond it runs are forgotten (a batch at a time) in the order of max_memory_bytes.
    max_runs: int = Field(1000, ge=1)
    #: A step waits this long for its missing ranks before it is merged without them.
    merge_timeout_s: float = Field(30.0, gt=0)
    #: Hard cap on steps waiting for ranks: beyond it the oldest is merged without its missing ranks.
    #: (A step is merged as soon as every missing rank has reported a later step: their report is lost.)
    max_pending_steps: int = Field(256, ge=1)
    #: A run with no new step for this long is taken as over (its job died without closing its monitor),
    #: which ends its "training stalled" alert.
    idle_finish_s: float = Field(6 * 3600.0, gt=0)
    #: Longest layer name a layout may hold, in characters (longer ones are refused as ``oversized``).
    max_layer_name: int = Field(256, ge=1, le=4096)
    #: Largest world size a run may declare (ranks are below it).
    max_world_size: int = Field(65536, ge=1, le=1_000_000)
    #: Bytes all runs may hold together (history, pending steps, findings, layouts, detector state; see
    #: ``gfservice.service.memory``); 0 for no bound. Past it runs are evicted: finished ones first, then idle
    #: ones, then live ones without active findings, a live run with active findings (or a stop verdict) last.
    #: The default fits the head node of deploy/kuberay (8 GiB requested).
    max_memory_bytes: int = Field(2 * 1024**3, ge=0)
    #: A finished run is forgotten this long after it finished (its series leave /metrics).
    finished_ttl_s: float = Field(3600.0, gt=0)
    #: A live run with no new step for this long counts as idle when runs must be evicted.
    idle_after_s: float = Field(600.0, gt=0)
    #: A step may be at most this far ahead of the run's newest step (else rejected as ``step_jump``), so one
    #: hostile step number cannot make every real step after it stale. A run's first step is not bounded.
    max_step_jump: int = Field(1_000_000, ge=1)
    #: Errors (exceptions, bad return values) a detector may make on one run before it is disabled for that run.
    detector_error_budget: int = Field(5, ge=1)
    #: Seconds a detector may take on one step: past it the service stops waiting for it and disables it for
    #: that run (a hung detector is abandoned on its own thread; the run's other detectors carry on). The
    #: built-in detectors take well under 10 ms on 1,000 layers: 5 s leaves room for a loaded machine.
    detector_time_budget_s: float = Field(5.0, gt=0)


class ExporterConfig(BaseModel):
    """Options of the ``/metrics`` endpoint and of what it exports (``[service.exporter]``)."""

    model_config = ConfigDict(extra="forbid")

    #: Contiguous depth buckets of ``gradflow_depth_grad_rms`` (input to output), whatever the model size.
    depth_buckets: int = Field(16, ge=1, le=100)
    #: Most layers with their own ``gradflow_layer_grad_norm`` series per run.
    max_layer_series: int = Field(32, ge=2, le=1000)
    #: Seconds a cleared finding stays exposed, so that a finding shorter than a scrape interval is seen.
    finding_linger_s: float = Field(300.0, ge=0)
    #: Address to bind; the default keeps the endpoint on this machine. Use "0.0.0.0" to expose it.
    address: str = "127.0.0.1"
    #: Port to bind; 0 picks a free one (Prometheus finds it through the discovery file).
    port: int = Field(0, ge=0, le=65535)
    #: Serve HTTPS with this certificate and key (PEM files); both or neither.
    certfile: str | None = None
    keyfile: str | None = None
    #: With TLS: require client certificates signed by this CA (mutual TLS).
    client_cafile: str | None = None
    #: Longest label value, in UTF-8 bytes (what Prometheus' ``label_value_length_limit`` counts); longer ones
    #: are cut and end in "..." and a hash of the whole value, so that they stay distinct.
    label_value_limit: int = Field(200, ge=32, le=65536)
    #: Seconds a client has to finish its TLS handshake and request, and again to read the response.
    connection_timeout_s: float = Field(10.0, gt=0)
    #: Threads that build scrapes (socket I/O never holds one: one more thread serves every connection).
    max_threads: int = Field(4, ge=1, le=64)
    #: Connections held open at once; past it the oldest one that has not sent its request yet is closed.
    max_connections: int = Field(256, ge=2, le=65536)

    @model_validator(mode="after")
    def _tls_pair(self) -> ExporterConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together: set both for TLS, or neither")
        if self.client_cafile and not self.certfile:
            raise ValueError("client_cafile needs certfile and keyfile (it is for mutual TLS)")
        return self


def default_state_dir() -> Path:
    """The service's own directory: ``$XDG_STATE_HOME/gfservice``, else ``~/.local/state/gfservice``."""
    base = os.environ.get("XDG_STATE_HOME", "")
    root = Path(base) if base and Path(base).is_absolute() else Path.home() / ".local" / "state"
    return root / "gfservice"


#: File names inside ``state_dir`` when ``snapshot_path`` / ``sd_file`` are not set.
SNAPSHOT_NAME = "snapshot.json"
SD_NAME = "prometheus-sd.json"


class ServiceConfig(BaseModel):
    """The ``[service]`` section: the Ray actor, its snapshots and its ``/metrics`` endpoint."""

    model_config = ConfigDict(extra="forbid")

    #: Ray actor name and namespace: monitors and ``gfservice.connect()`` find the service by them.
    name: str = DEFAULT_NAME
    namespace: str = DEFAULT_NAMESPACE
    #: The service's private directory (created 0700; refused if another user owns it or others can write it).
    state_dir: str = Field(default_factory=lambda: str(default_state_dir()))
    #: Where detector state and findings are saved (JSON), so that a restarted service resumes ("" disables;
    #: default ``<state_dir>/snapshot.json``; its directory is checked like ``state_dir``).
    snapshot_path: str | None = None
    snapshot_interval_s: float = Field(5.0, gt=0)
    #: How often overdue steps are merged (rank timeouts).
    tick_interval_s: float = Field(0.5, gt=0)
    #: /metrics endpoint: None disables it, 0 picks a free port.
    metrics_port: int | None = Field(None, ge=0, le=65535)
    metrics_addr: str = "127.0.0.1"
    #: The host (name or address, no port) Prometheus should scrape, written to the discovery file: for an
    #: endpoint bound to "0.0.0.0" that is reached under another name (a DNS name, a NAT address). Default: the
    #: ``metrics_addr``, or this machine's address when ``metrics_addr`` binds every interface.
    advertise_addr: str | None = None
    #: Prometheus file-based service discovery file, rewritten whenever the endpoint moves ("" disables;
    #: default ``<state_dir>/prometheus-sd.json``; its directory is checked like ``state_dir``).
    sd_file: str | None = None
    #: A file holding the service token (mode 0600, owned by this user; ``$GFSERVICE_TOKEN`` wins over it). With a
    #: token, every submitter and every status, findings and shutdown call must present it (see SECURITY.md).
    #: Only the path is kept here, never the token.
    token_file: str | None = None
    #: Aggregator actors the service runs, each holding the runs a hash of the run name gives it, with its own
    #: ``/metrics``, snapshot and discovery entry (see docs/explanation/fleet.md). Shard 0 is the service as
    #: with one shard; shard i is the actor ``NAME-shard-i`` with its state in ``<state_dir>/shard-i`` and, when
    #: ``metrics_port`` is fixed, its ``/metrics`` on ``metrics_port + i``. Adding one moves about 1/N of the runs.
    shards: int = Field(1, ge=1, le=256)
    #: Options of the Prometheus exporter.
    exporter: ExporterConfig = Field(default_factory=ExporterConfig)

    @model_validator(mode="after")
    def _files_in_state_dir(self) -> ServiceConfig:
        if self.snapshot_path is None:
            self.snapshot_path = str(Path(self.state_dir) / SNAPSHOT_NAME)
        if self.sd_file is None:
            self.sd_file = str(Path(self.state_dir) / SD_NAME)
        return self

    def exporter_config(self, port: int) -> ExporterConfig:
        """The exporter's settings bound to ``metrics_addr`` and ``port``."""
        return self.exporter.model_copy(update={"address": self.metrics_addr, "port": port})


class Settings(BaseSettings):
    """Everything a configuration file (or ``GFSERVICE_*`` variables) can set."""

    model_config = SettingsConfigDict(extra="forbid", env_prefix="GFSERVICE_", env_nested_delimiter="__",
                                      case_sensitive=False)

    detectors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    aggregator: AggregatorConfig = Field(default_factory=AggregatorConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    #: Where rank 0's monitor also sends steps and findings: "tensorboard[:DIR]", "wandb", "mlflow".
    sinks: list[str] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (env_settings, init_settings)  # the environment overrides the file

    @model_validator(mode="after")
    def _detectors_build(self) -> Settings:
        self.detectors = registry.validate(self.detectors)
        return self

    def with_service(self, **overrides: Any) -> Settings:
        """A copy with ``[service]`` fields replaced (``None`` values are ignored), validated."""
        fields = {k: v for k, v in overrides.items() if v is not None}
        base = self.service.model_dump()
        if "state_dir" in fields:  # files left at their default follow the state directory
            for key, name in (("snapshot_path", SNAPSHOT_NAME), ("sd_file", SD_NAME)):
                if base[key] == str(Path(base["state_dir"]) / name):
                    base[key] = None
        service = ServiceConfig.model_validate({**base, **fields})
        return self.model_copy(update={"service": service})


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


def load_settings(path: str | os.PathLike[str] | None = None, data: dict[str, Any] | None = None,
                  env: bool = True) -> Settings:
    """Read and validate a configuration file (or an already parsed dict), ``GFSERVICE_*`` variables on top.

    Raises :class:`ConfigError` naming the file, the section and the field.
    """
    where = str(path) if path else "settings"
    raw = read_file(Path(path)) if path else dict(data or {})
    try:
        if env:
            return Settings(**raw)
        return Settings.model_validate(raw)  # the model validator only: no environment
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except ValidationError as exc:
        e = exc.errors()[0]
        loc = ".".join(map(str, e["loc"]))
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "value_error" and not e["loc"]:  # the registry's own message names the detector
            raise ConfigError(f"{where}: {msg}") from None
        raise ConfigError(f"{where}: {loc}: {msg}") from None
