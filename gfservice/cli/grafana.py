"""``gfservice grafana push``: the command around :func:`gfservice.observability.grafana.push`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any
from urllib.parse import urlsplit

from gfservice.cli.argparsing import two_level

__all__ = ["add_parser", "push_main"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gfservice grafana push`` on an argparse ``subparsers`` object; returns the ``push`` parser."""
    from gfservice.observability.grafana import DEFAULT_URL

    push_p = two_level(
        subparsers, "grafana", "work with a Grafana server", "Work with a Grafana server.",
        "push", "create or update the gfservice folder, dashboards and alert rules in a Grafana",
        "Create or update the gfservice folder, dashboards and Grafana-managed alert rules in a Grafana, "
        "idempotently. Needs a service account token with the Editor role.",
    )
    push_p.add_argument("--url", default=os.environ.get("GRAFANA_URL", DEFAULT_URL),
                        help=f"Grafana's URL (default $GRAFANA_URL or {DEFAULT_URL}); a user:password@ in it is "
                             "basic auth when there is no token, and is never printed")
    push_p.add_argument("--token", default=os.environ.get("GRAFANA_TOKEN", ""),
                        help="service account token (default $GRAFANA_TOKEN; prefer the variable: a flag shows in ps)")
    push_p.add_argument("--dashboards", metavar="DIR",
                        help="directory of dashboard JSON files (default: the dashboards gfservice ships)")
    push_p.add_argument("--alerts", metavar="FILE",
                        help="Grafana alert rule provisioning YAML (default: the rules gfservice ships, as written "
                             "by gfservice alerts render)")
    push_p.add_argument("--no-alerts", action="store_true", help="push the folder and dashboards only")
    push_p.add_argument("--folder", default="gfservice", help="folder title (default gfservice)")
    push_p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each answer (default 10)")
    push_p.set_defaults(func=run)
    return push_p


def run(args: argparse.Namespace) -> int:
    """Execute ``gfservice grafana push``; prints what changed, or the error; returns the exit status."""
    from gfservice.observability.grafana import GrafanaError, push, redact

    try:
        summary = push(args.url, args.token, args.dashboards, args.alerts, args.folder, alerts=not args.no_alerts,
                       timeout=args.timeout)
    except GrafanaError as exc:
        print(f"gfservice grafana push: {redact(str(exc), (args.token, urlsplit(args.url).password))}",
              file=sys.stderr)
        return 1
    print(redact(str(summary), (args.token,)))
    return 0


def push_main(argv: list[str] | None = None) -> int:
    """``gfservice grafana push`` as a stand-alone entry point: ``push_main(["push", "--url", ...])``."""
    parser = argparse.ArgumentParser(prog="gfservice")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["grafana", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))
