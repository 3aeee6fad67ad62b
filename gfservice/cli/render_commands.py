"""``gfservice alerts render``, ``gfservice dashboards render`` and ``gfservice kubernetes render``: the files
generated from :mod:`gfservice.observability.alerts`, :mod:`~gfservice.observability.dashboards` and
:mod:`~gfservice.observability.kubernetes`, written or checked (``--check``) by :mod:`gfservice.cli.generated`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from gfservice.cli.argparsing import two_level
from gfservice.cli.generated import render_or_check

__all__ = ["add_parsers"]


def add_parsers(sub: Any) -> None:
    """Register the three ``render`` commands on the ``gfservice`` subcommands."""
    _alerts_parser(sub)
    _dashboards_parser(sub)
    _kubernetes_parser(sub)


def _check_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true",
                   help="write nothing; name the files under DIR that differ and exit 1 if any")


# ---- alerts ----------------------------------------------------------------------------------------------------
def _alerts_parser(sub: Any) -> None:
    from gfservice.observability import alerts

    render = two_level(
        sub, "alerts", "gfservice's alert rules (Prometheus and Grafana-managed)",
        "gfservice's alerts, defined once in gfservice/observability/alerts.py.",
        "render", "write the Prometheus rule file and the Grafana-managed alert rules",
        f"Write DIR/{alerts.PROMETHEUS_RULES_FILE} (Prometheus) and DIR/{alerts.GRAFANA_RULES_FILE} (Grafana file "
        "provisioning) from the alert definitions.",
    )
    render.add_argument("--out", default=None, metavar="DIR",
                        help=f"directory laid out like the repository's deploy/ (default ./{alerts.DEFAULT_OUT})")
    _check_flag(render)
    render.add_argument("--runbook-base", default=alerts.RUNBOOK_BASE, metavar="URL",
                        help=f"URL prefix of the runbooks (default {alerts.RUNBOOK_BASE})")
    render.add_argument("--datasource-uid", default=alerts.DATASOURCE_UID, metavar="UID",
                        help=f"uid of the Grafana Prometheus data source (default {alerts.DATASOURCE_UID})")
    render.add_argument("--format", choices=["files", "prometheusrule"], default="files",
                        help="files: both rule files under DIR (the default); prometheusrule: one Prometheus "
                             "operator PrometheusRule manifest, written to --out FILE (default "
                             f"./{alerts.PROMETHEUS_RULE_MANIFEST}; - for stdout)")
    render.set_defaults(func=_alerts)


def _alerts(args: argparse.Namespace) -> int:
    from gfservice.observability import alerts

    if args.format == "prometheusrule":
        return _prometheus_rule(args)
    out = args.out or str(alerts.DEFAULT_OUT)
    return render_or_check(out, alerts.rendered_files(args.runbook_base, args.datasource_uid), check=args.check,
                           fix=f"gfservice alerts render --out {out}")


def _prometheus_rule(args: argparse.Namespace) -> int:
    """``alerts render --format prometheusrule``: one manifest to a file (or stdout); ``--check`` compares it."""
    from gfservice.observability import alerts

    text = alerts.render_prometheus_rule(args.runbook_base)
    out = args.out or str(alerts.PROMETHEUS_RULE_MANIFEST)
    if out == "-":
        if args.check:
            print("--check needs a file (--out FILE)", file=sys.stderr)
            return 2
        sys.stdout.write(text)
        return 0
    path = Path(out)
    return render_or_check(path.parent, {path.name: text}, check=args.check,
                           fix=f"gfservice alerts render --format prometheusrule --out {out}")


# ---- dashboards ------------------------------------------------------------------------------------------------
def _dashboards_parser(sub: Any) -> None:
    from gfservice.observability.dashboards import DEFAULT_OUT

    render = two_level(
        sub, "dashboards", "gfservice's Grafana dashboards",
        "gfservice's Grafana dashboards (Run health, Fleet, Service).",
        "render", "write the dashboard JSON files",
        "Write gfservice's dashboards as Grafana JSON (run-health.json, fleet.json, service.json), built from "
        "gfservice/observability/dashboards.py when grafana-foundation-sdk is installed, else the JSON this "
        "gfservice ships.",
    )
    render.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR",
                        help=f"directory to write into (default ./{DEFAULT_OUT})")
    _check_flag(render)
    render.set_defaults(func=_dashboards)


def _dashboards(args: argparse.Namespace) -> int:
    from gfservice.observability import dashboards

    if not dashboards.sdk_available():
        print("gfservice dashboards render: grafana-foundation-sdk is not installed (pip install "
              "'gfservice[grafana]' to build from the code): using the dashboards this gfservice ships",
              file=sys.stderr)
    return render_or_check(args.out, dashboards.rendered_files(), check=args.check,
                           fix=f"gfservice dashboards render --out {args.out}")


# ---- kubernetes ------------------------------------------------------------------------------------------------
def _kubernetes_parser(sub: Any) -> None:
    from gfservice.observability import alerts
    from gfservice.observability.kubernetes import DEFAULT_OUT

    render = two_level(
        sub, "kubernetes", "the generated files of the Kubernetes bundle",
        "The generated files of deploy/kubernetes/: dashboard ConfigMaps, the PrometheusRule and the rule-file "
        "ConfigMap.",
        "render", "write the generated manifests",
        "Write the dashboard ConfigMaps, the PrometheusRule and the rule-file ConfigMap under DIR, laid out like the "
        "repository's deploy/kubernetes/.",
    )
    render.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR",
                        help=f"the bundle's directory (default ./{DEFAULT_OUT})")
    _check_flag(render)
    render.add_argument("--runbook-base", default=alerts.RUNBOOK_BASE, metavar="URL",
                        help=f"URL prefix of the runbooks (default {alerts.RUNBOOK_BASE})")
    render.set_defaults(func=_kubernetes)


def _kubernetes(args: argparse.Namespace) -> int:
    from gfservice.observability import kubernetes

    return render_or_check(args.out, kubernetes.rendered_files(args.runbook_base), check=args.check,
                           fix=f"gfservice kubernetes render --out {args.out}")
