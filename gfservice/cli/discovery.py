"""``gfservice discovery prune``: remove the Prometheus discovery entries (``prometheus-sd*.json``) of this host
whose owner process is gone (a rank 0 killed outright, a service whose node rebooted), so that
``GradflowServiceDown`` stops paging for jobs that ended. See
:func:`gfservice.observability.discovery.prune_sd_files`; run it from cron or a systemd timer where jobs are
often killed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gfservice.cli.argparsing import two_level

__all__ = ["add_parser", "prune"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``gfservice discovery prune`` on an argparse ``subparsers`` object."""
    p = two_level(subparsers, "discovery", "the Prometheus discovery entries", "The Prometheus discovery entries "
                  "(file_sd) that the service and torchrun rank 0 write.", "prune",
                  "remove the entries of this host whose owner has exited",
                  "Remove the discovery files of this host whose owner process has exited (or whose pid now "
                  "belongs to another process). Entries of other hosts and of other users are left alone.")
    p.add_argument("--dir", default=None,
                   help="directory of the discovery files (default: that of [service] sd_file)")
    p.add_argument("--pattern", default=None, help="file glob (default: SD_STEM*.json, as prometheus.yml reads)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")
    p.set_defaults(func=prune)
    return p


def prune(args: argparse.Namespace) -> int:
    """Execute ``gfservice discovery prune``; prints each file removed and why."""
    from gfservice.config import load_settings
    from gfservice.observability.discovery import prune_sd_files

    sd_file = Path(load_settings(data={}).service.sd_file or "prometheus-sd.json")
    directory = Path(args.dir) if args.dir else sd_file.parent
    pattern = args.pattern or f"{sd_file.stem}*{sd_file.suffix or '.json'}"
    removed = prune_sd_files(directory, pattern, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for path, why in removed:
        print(f"{verb} {path}: {why}")
    print(f"{len(removed)} stale discovery file(s) in {directory} ({pattern})")
    return 0
