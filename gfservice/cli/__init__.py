"""The ``gfservice`` command line (:func:`main`) and the demo. Heavy imports happen inside each subcommand."""

from gfservice.cli.main import main

__all__ = ["main"]
