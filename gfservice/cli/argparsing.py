"""argparse plumbing shared by the subcommands.

>>> import argparse
>>> parser = argparse.ArgumentParser(prog="gfservice")
>>> render = two_level(parser.add_subparsers(dest="command"), "alerts", "the alert rules", "The alert rules.",
...                    "render", "write them", "Write the rule files.")
>>> render.set_defaults(func=len)
>>> parser.parse_args(["alerts", "render"]).alerts_command
'render'
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["two_level"]


def two_level(sub: Any, command: str, help: str, description: str, action: str, action_help: str,
              action_description: str) -> argparse.ArgumentParser:
    """Register ``gfservice COMMAND ACTION`` (e.g. ``alerts render``); returns the ACTION parser to add to."""
    p = sub.add_parser(command, help=help, description=description)
    inner = p.add_subparsers(dest=f"{command}_command", required=True, metavar="COMMAND")
    action_parser: argparse.ArgumentParser = inner.add_parser(action, help=action_help,
                                                              description=action_description)
    return action_parser
