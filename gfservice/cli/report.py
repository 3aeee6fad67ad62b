"""``gfservice report``: draw a run's gradient flow (:mod:`gfservice.observability.report`) from the running
service's history of the run, or from a history file (:mod:`gfservice.observability.history`)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gfservice.api import Finding, StepStats

__all__ = ["add_parser", "from_service", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gfservice report`` on an argparse ``subparsers`` object; :func:`run` executes it."""
    p = subparsers.add_parser(
        "report", help="draw a run's gradient flow to a PNG or HTML page",
        description="Draw a run's gradient flow (layers by step), per-layer profiles and global norm with "
                    "findings, from the running service's history of RUN or from a saved history file.",
    )
    p.add_argument("run", nargs="?", help="the run (omit with --history to take the file's run)")
    p.add_argument("--out", required=True, help="output file: .png or .html")
    p.add_argument("--history", metavar="FILE", help="read a history file (see --save-history) instead of the service")
    p.add_argument("--save-history", metavar="FILE", help="also save the history fetched from the service to FILE")
    p.add_argument("--address", default=None, help="Ray address of the service's cluster (default: the local one)")
    p.add_argument("--steps", help="comma-separated steps for the per-layer profile, e.g. 0,500,1000")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the picture (default 100)")
    p.set_defaults(func=run)
    return p


def from_service(run_name: str, address: str | None) -> tuple[list[StepStats], list[Finding]]:
    """The merged steps and the findings of ``run_name``, read from the running service (over Ray)."""
    from gfservice.service.client import connect

    client = connect(address)  # ConnectionError, with a message, when no service runs
    return list(client.history(run_name)), list(client.findings(run_name))


def run(args: argparse.Namespace) -> int:
    """Execute ``gfservice report``; prints what it wrote, or the error; returns the exit status."""
    from gfservice.observability.report import ReportError

    try:
        return _run(args)
    except (ReportError, ValueError) as exc:
        print(f"gfservice report: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from gfservice.observability import history as hist
    from gfservice.observability.report import ReportError, render

    if args.history:
        steps, findings = hist.load(args.history)
        if args.run and steps and steps[0].run != args.run:
            raise ReportError(f"{args.history} holds run {steps[0].run!r}, not {args.run!r}")
    elif args.run:
        steps, findings = from_service(args.run, args.address)
        if not steps:
            raise ReportError(f"the service has no merged steps of run {args.run!r}")
        if args.save_history:
            print(f"saved history to {hist.save(args.save_history, steps, findings)}")
    else:
        raise ReportError("name a RUN (from the service) or give --history FILE")
    chosen = [int(s) for s in args.steps.split(",") if s.strip()] if args.steps else None
    out = render(steps, findings, args.out, chosen, dpi=args.dpi)
    print(f"wrote {out}")
    return 0
