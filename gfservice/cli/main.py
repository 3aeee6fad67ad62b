"""The ``gfservice`` command line. Each subcommand's arguments and output live in a module of ``gfservice.cli``
that calls the library room doing the job; this file only assembles them and dispatches (heavy imports happen
inside the subcommand).
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Sequence

from gfservice._version import __version__


def _detectors(args: argparse.Namespace) -> int:
    from gfservice import registry

    rows = registry.describe()
    if not rows:
        print("no detector plugins installed (entry-point group gfservice.detectors)")
        return 1
    for row in rows:
        print(f"{row['name']}  ({row['module']})")
        print(f"    {row['summary']}")
        for field, (default, annotation) in row["fields"].items():
            plain = typing.get_origin(annotation) is None and hasattr(annotation, "__name__")
            type_name = annotation.__name__ if plain else str(annotation).replace("typing.", "")
            print(f"    {field:<24} {type_name:<16} default {default!r}")
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gfservice",
        description="Training health for PyTorch: gradient statistics, detectors, Prometheus and Grafana.",
    )
    parser.add_argument("--version", action="version", version=f"gfservice {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("detectors", help="list installed detector plugins, their fields and defaults")
    p.set_defaults(func=_detectors)

    from gfservice.cli import backtest, demo, discovery, grafana, render_commands, report

    demo.add_parser(sub)
    backtest.add_parsers(sub)  # gfservice backtest HISTORY.npz [--config A.toml] [--compare B.toml]; configure RUN
    report.add_parser(sub)  # gfservice report RUN --out report.png [--history FILE]
    grafana.add_parser(sub)  # gfservice grafana push --url URL --token TOKEN
    render_commands.add_parsers(sub)  # gfservice {alerts,dashboards,kubernetes} render [--out DIR] [--check]
    discovery.add_parser(sub)  # gfservice discovery prune [--dir DIR] [--dry-run]
    try:
        from gfservice.cli import service_commands
    except ImportError:  # the Ray extra is not installed
        pass
    else:
        service_commands.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except Exception as exc:  # a clear message, not a traceback, for expected failures
        from gfservice.errors import ConfigError

        if isinstance(exc, ConfigError | FileNotFoundError | ConnectionError):
            print(f"gfservice: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
