"""Writing a file atomically: readers see the old content or the new, never half a file.

The text goes to a unique temporary file in the target's directory (``mkstemp``: ``O_EXCL``, mode 0600, owner
only), is flushed and fsynced, then renamed over the target (``os.replace``, atomic on POSIX). On any failure the
temporary file is removed and the target is left as it was. ``previous`` keeps the file it replaces under that
name (the service's ``snapshot.prev.json``); ``sync_dir`` fsyncs the directory too, so the rename itself survives
a crash.

>>> import pathlib, stat, tempfile
>>> p = atomic_write(pathlib.Path(tempfile.mkdtemp()) / "sub" / "f.json", '{"a": 1}\\n')
>>> p.read_text(), oct(stat.S_IMODE(p.stat().st_mode))
('{"a": 1}\\n', '0o600')
>>> _ = atomic_write(p, "{}\\n", previous=p.with_name("f.prev.json"), sync_dir=True)
>>> p.read_text(), p.with_name("f.prev.json").read_text()
('{}\\n', '{"a": 1}\\n')
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], text: str, *, mode: int = 0o600,
                 previous: str | os.PathLike[str] | None = None, sync_dir: bool = False) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically, creating its directory; the file gets ``mode``
    (default owner-only, like every file the service writes: SECURITY.md). Returns the path.

    ``previous``: first rename the regular file being replaced to this name. ``sync_dir``: fsync the directory
    after the rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        if previous is not None:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(os.lstat(target).st_mode):
                    os.replace(target, previous)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync_dir:
        dir_fd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target
