"""``gfservice backtest`` (what a detector configuration would have raised on a saved run) and
``gfservice configure`` (change the detectors of a live run on the service, without restarting anything).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gfservice.cli.tables import table
from gfservice.config import DEFAULT_NAME, DEFAULT_NAMESPACE

if TYPE_CHECKING:
    from gfservice.api import Finding, StepStats
    from gfservice.service.backtest import Backtest

#: A history longer than this shows its replay progress on stderr (a terminal always does).
PROGRESS_STEPS = 3000
#: Widest message and layers/ranks cells of a table (``--json`` has them whole).
MESSAGE_WIDTH = 90
WHERE_WIDTH = 44


def add_parsers(sub: Any) -> None:
    """Register ``backtest`` and ``configure`` on the ``gfservice`` subcommands."""
    p = sub.add_parser(
        "backtest", help="replay a saved run through a detector configuration: what would have fired, and when",
        description="Replay a run's merged steps (a history file from `gfservice report RUN --save-history FILE` "
        "or `gfservice demo --save-history FILE`, or --run RUN from the running service) through fresh detectors "
        "built from a configuration file, through the same finding lifecycle as the service, and print what would "
        "have fired. With --compare, run two configurations on the same history and print them side by side.",
    )
    p.add_argument("history", nargs="?", help="history file (.npz); omit with --run")
    p.add_argument("--run", default=None, help="fetch this run's history from the running service instead")
    p.add_argument("--address", default=None, help="Ray address of the service's cluster (with --run)")
    p.add_argument("--config", default=None,
                   help="TOML/YAML configuration whose [detectors] to test (default: the detectors' defaults)")
    p.add_argument("--compare", default=None, metavar="B.toml", help="a second configuration, shown side by side")
    p.add_argument("--detectors", default=None, metavar="NAME,...", help="run only these detectors")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--guard", action="store_true",
                   help="replay guard mode instead of the detectors: which steps would the guard have skipped")
    p.add_argument("--guard-set", dest="guard_sets", action="append", default=[], metavar="FIELD=VALUE",
                   help="a GuardConfig field for --guard (repeatable), e.g. ratio=100, z=8, per_layer=true")
    p.set_defaults(func=_backtest)

    p = sub.add_parser(
        "configure", help="change the detectors of a live run on the service (no restart)",
        description="Apply detector settings to a live run on the running service from its next step on, "
        "without restarting the training job or the service. Fields not named keep their value; each changed "
        "detector keeps its state where it can. Findings raised afterwards carry the new configuration version.",
    )
    p.add_argument("run", help="the run to reconfigure")
    p.add_argument("--config", default=None, help="TOML/YAML file whose [detectors] section to apply")
    p.add_argument("--detectors", default=None, metavar="NAME,...",
                   help="apply only these detectors' sections of --config")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="DETECTOR.FIELD=VALUE",
                   help="set one field (repeatable; a TOML value: 8, 1e-3, true, \"text\"; none for None)")
    p.add_argument("--address", default=None, help="Ray address of the service's cluster (default: the local one)")
    p.add_argument("--name", default=DEFAULT_NAME, help=f"service actor name (default {DEFAULT_NAME})")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE, help=f"service namespace (default {DEFAULT_NAMESPACE})")
    p.add_argument("--json", action="store_true", help="print the service's summary as JSON")
    p.set_defaults(func=_configure)


# ---- backtest ---------------------------------------------------------------------------------------------
def _names(text: str | None) -> list[str] | None:
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def _detector_settings(path: str | None) -> dict[str, dict[str, Any]]:
    """The ``[detectors]`` of a configuration file (validated; the file alone, no ``GFSERVICE_*`` variables)."""
    from gfservice.config import load_settings

    return load_settings(path, env=False).detectors if path else {}


def _load_steps(args: argparse.Namespace) -> tuple[list[StepStats], str]:
    if args.run:
        from gfservice.service.client import connect

        steps = list(connect(args.address).history(args.run))
        if not steps:
            raise ValueError(f"the service has no merged steps of run {args.run!r}")
        return steps, f"run {args.run} (service)"
    if not args.history:
        raise ValueError("give a history file or --run RUN")
    from gfservice.observability import history

    return history.load(args.history).steps, args.history


def _progress(label: str, total: int) -> Callable[[int], None] | None:
    if total <= PROGRESS_STEPS and not sys.stderr.isatty():
        return None
    every = max(1, total // 10)

    def report(i: int) -> None:
        if i % every == 0 or i == total:
            print(f"{label}: replayed {i}/{total} steps ({100 * i // total}%)", file=sys.stderr, flush=True)

    return report


def _label(path: str | None) -> str:
    return Path(path).stem if path else "defaults"


def _guard_backtest(args: argparse.Namespace) -> int:
    """``backtest --guard``: the steps a guard configuration would have skipped on the history."""
    from pydantic import ValidationError

    from gfservice.errors import ConfigError
    from gfservice.service.backtest import guard_backtest
    from gfservice.training.guard import GuardConfig

    try:
        fields = {}
        for name, value in parse_set([f"guard.{item}" for item in args.guard_sets]).get("guard", {}).items():
            fields[name] = value
        config = GuardConfig(**fields)
        steps, source = _load_steps(args)
        res = guard_backtest(steps, config)
    except (ValueError, ConfigError, ValidationError) as exc:
        print(f"gfservice backtest: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"history": source, "run": res.run, "steps": res.steps, "config": config.model_dump(),
                          "skipped": res.skipped, "let_through": res.let_through}, indent=2))
        return 0
    print(f"{source}: run {res.run}, {len(steps)} merged steps (steps {steps[0].step} to {steps[-1].step})")
    print(f"guard: {', '.join(f'{k}={v}' for k, v in config.model_dump().items())}\n")
    if res.skipped:
        print(table(("step", "reason"), [(str(s), r) for s, r in res.skipped]))
    n = len(res.skipped)
    verb = "rescaled" if config.policy == "clip" else "skipped"
    print(f"\nthe guard would have {verb} {n} step{'s' * (n != 1)} of {res.steps}"
          + (f"; let {len(res.let_through)} poisoned steps through after {config.max_consecutive} in a row"
             if res.let_through else ""))
    return 0


def _backtest(args: argparse.Namespace) -> int:
    from gfservice.service.backtest import backtest

    if getattr(args, "guard", False):
        return _guard_backtest(args)
    try:
        configs = [(_label(args.config), args.config, _detector_settings(args.config))]
        if args.compare:
            label = _label(args.compare)
            configs.append((label if label != configs[0][0] else f"{label} (B)", args.compare,
                            _detector_settings(args.compare)))
        steps, source = _load_steps(args)
        only = _names(args.detectors)
        results = [backtest(steps, settings, only, _progress(label, len(steps))) for label, _, settings in configs]
    except ValueError as exc:  # a missing or unreadable history; ConfigError (a ValueError too) names the field
        print(f"gfservice backtest: {exc}", file=sys.stderr)
        return 1
    labels = [label for label, _, _ in configs]
    if args.json:
        print(json.dumps(_as_json(source, configs, results), indent=2, default=str))
        return 0
    print(f"{source}: run {results[0].run}, {len(steps)} merged steps (steps {steps[0].step} to {steps[-1].step})")
    if len(results) == 1:
        print(f"configuration: {configs[0][1] or 'detector defaults'}\n")
        print(format_findings(results[0].findings))
    else:
        print(f"A: {configs[0][1] or 'detector defaults'}   B: {configs[1][1] or 'detector defaults'}\n")
        print(format_comparison(results[0].findings, results[1].findings, labels))
    print()
    tags = ["A", "B"] if len(results) > 1 else [""]
    for tag, label, res in zip(tags, labels, results, strict=True):
        print(_summary_line(tag, label, res))
    return 0


def _where(f: Finding) -> str:
    from gfservice.api import describe_layers

    parts = []
    if f.layers:
        parts.append(describe_layers(f.layers).removeprefix("layers ").removeprefix("layer "))
    if f.ranks:
        parts.append("rank " + ",".join(map(str, f.ranks)))
    return "; ".join(parts) or "-"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def format_findings(findings: Sequence[Finding]) -> str:
    """One configuration's findings as a table: what fired, from which step to which, how often, where."""
    if not findings:
        return "nothing would have fired"
    header = ("detector", "severity", "key", "first", "last", "times", "layers/ranks", "message")
    rows = [(f.detector, f.severity.value, f.key or "-", str(f.since), str(f.last_step), str(f.occurrences),
             _cut(_where(f), WHERE_WIDTH), _cut(f.message, MESSAGE_WIDTH)) for f in findings]
    return table(header, rows)


def format_comparison(a: Sequence[Finding], b: Sequence[Finding], labels: Sequence[str] = ("A", "B")) -> str:
    """Two configurations' findings on one history, side by side: one row per finding, its first step under
    each configuration ("-" where that one did not raise it)."""
    from gfservice.service.backtest import pair

    rows = []
    for fa, fb in pair(a, b):
        f = fa or fb
        assert f is not None
        sev = {x.severity.value for x in (fa, fb) if x is not None}
        delta = "" if fa is None or fb is None else f"{fb.since - fa.since:+d}"
        rows.append((f.detector, "/".join(sorted(sev)), f.key or "-", "-" if fa is None else str(fa.since),
                     "-" if fb is None else str(fb.since), delta or "-", _cut(_where(f), WHERE_WIDTH),
                     _cut(f.message, MESSAGE_WIDTH)))
    if not rows:
        return "nothing would have fired under either configuration"
    header = ("detector", "severity", "key", f"A {labels[0]}", f"B {labels[1]}", "B-A", "layers/ranks", "message")
    return table(header, rows)


def _summary_line(tag: str, label: str, res: Backtest) -> str:
    from gfservice.service.backtest import severity_counts

    counts = severity_counts(res.findings)
    by = ", ".join(f"{n} {s}" for s, n in counts.items())
    n = len(res.findings)
    line = f"{tag + ' ' if tag else ''}{label}: {n} finding{'s' * (n != 1)}{f' ({by})' if by else ''}"
    line += f", {len(res.detectors)} detectors"
    if res.skipped:
        line += f"; disabled by the configuration: {', '.join(res.skipped)}"
    if res.errors:
        line += "; detector errors: " + ", ".join(f"{d} on {k} steps" for d, k in res.errors.items())
    if res.stop_reason:
        line += f"; would have stopped the run ({_cut(res.stop_reason, 60)})"
    return line


def _as_json(source: str, configs: Sequence[tuple[str, str | None, dict[str, Any]]],
             results: Sequence[Backtest]) -> dict[str, Any]:
    out: dict[str, Any] = {"history": source, "run": results[0].run, "steps": results[0].steps, "configs": []}
    for (label, path, settings), res in zip(configs, results, strict=True):
        out["configs"].append({
            "label": label, "path": path, "settings": settings, "detectors": res.detectors,
            "skipped": list(res.skipped), "errors": res.errors, "stop_reason": res.stop_reason,
            "detector_seconds": res.seconds, "findings": [f.model_dump(mode="json") for f in res.findings],
        })
    if len(results) == 2:
        from gfservice.service.backtest import pair

        out["pairs"] = [{"detector": (fa or fb).detector, "key": (fa or fb).key,  # type: ignore[union-attr]
                         "a_first": None if fa is None else fa.since, "b_first": None if fb is None else fb.since}
                        for fa, fb in pair(results[0].findings, results[1].findings)]
    return out


# ---- configure --------------------------------------------------------------------------------------------
def parse_set(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["exploding.z_threshold=8", ...]`` as detector settings; values are TOML values (strings unquoted too).

    >>> parse_set(["exploding.z_threshold=8", "exploding.max_norm=none", "vanishing.enabled=false"])
    {'exploding': {'z_threshold': 8, 'max_norm': None}, 'vanishing': {'enabled': False}}
    """
    from gfservice.errors import ConfigError

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        target, sep, text = item.partition("=")
        detector, dot, name = target.strip().partition(".")
        if not (sep and dot and detector and name):
            raise ConfigError(f"--set {item!r}: expected DETECTOR.FIELD=VALUE, e.g. exploding.z_threshold=8")
        text = text.strip()
        value: Any
        if text.lower() in ("none", "null"):
            value = None
        else:
            try:
                value = tomllib.loads(f"v = {text}")["v"]
            except tomllib.TOMLDecodeError:
                value = text
        out.setdefault(detector, {})[name.strip()] = value
    return out


def _configure(args: argparse.Namespace) -> int:
    from gfservice.errors import ConfigError

    try:
        settings = _detector_settings(args.config) if args.config else {}
        only = _names(args.detectors)
        if only is not None:
            if not args.config:
                raise ConfigError("--detectors picks sections of --config: give --config FILE")
            missing = [n for n in only if n not in settings]
            if missing:
                raise ConfigError(f"{args.config} has no [detectors.{missing[0]}] section")
            settings = {n: settings[n] for n in only}
        for name, fields in parse_set(args.sets).items():
            settings[name] = {**settings.get(name, {}), **fields}
        if not settings:
            raise ConfigError("nothing to change: give --config FILE (with a [detectors] section) or --set")
        from gfservice.service.client import connect

        summary = connect(args.address, args.name, args.namespace).configure(args.run, settings)
    except (ConfigError, KeyError) as exc:
        print(f"gfservice configure: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    print(format_configure(summary))
    return 0


def format_configure(summary: dict[str, Any]) -> str:
    """What ``configure`` changed, per detector (old -> new fields), and from which step it applies.

    >>> print(format_configure({"run": "r", "step": 12, "version": 1, "changed": True, "detectors": {
    ...     "exploding": {"fields": {"z_threshold": [6.0, 8.0]}, "state": "carried over"}}}))
    run r: detector configuration 1 applies from step 12
      exploding  z_threshold 6.0 -> 8.0  (state carried over)
    """
    if not summary["changed"]:
        head = f"run {summary['run']}: nothing changed (configuration {summary['version']} stays)"
    else:
        head = (f"run {summary['run']}: detector configuration {summary['version']} applies from step "
                f"{summary['step']}")
    lines = [head]
    width = max((len(n) for n in summary["detectors"]), default=0)
    for name, d in summary["detectors"].items():
        fields = ", ".join(f"{f} {old!r} -> {new!r}" for f, (old, new) in d["fields"].items()) or "no field changes"
        state = "state carried over" if d["state"] == "carried over" else d["state"]
        lines.append(f"  {name.ljust(width)}  {fields}  ({state})")
    return "\n".join(lines)
