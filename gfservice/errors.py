"""The error types that cross rooms: a bottom-level module, importable from anywhere without importing a room.

:class:`ConfigError` is a ``ValueError``: a configuration names something that does not exist or holds a value
that does not fit. The command line prints it as one line (``gfservice: error: ...``) instead of a traceback.
Its subclasses say which kind of configuration: the state directory (``gfservice.service.state.StateDirError``)
and the token file (``gfservice.service.auth.TokenFileError``).

>>> issubclass(ConfigError, ValueError)
True
>>> import gfservice.registry
>>> gfservice.registry.ConfigError is ConfigError   # the public name of before
True
"""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration names something that does not exist or holds a value that does not fit."""
