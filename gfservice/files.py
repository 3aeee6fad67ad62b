"""Writing a file atomically: readers see the old content or the new, never half a file.

The text goes to a unique temporary file in the target's directory (``mkstemp``: ``O_EXCL``, mode 0600, owner
only), is flushed and fsynced, then renamed over the target (``os.replace``, atomic on POSIX). On any failure the
temporary file is removed and the target is left as it was.

>>> import pathlib, stat, tempfile
>>> p = atomic_write(pathlib.Path(tempfile.mkdtemp()) / "sub" / "f.json", '{"a": 1}\\n')
>>> p.read_text(), oct(stat.S_IMODE(p.stat().st_mode))
('{"a": 1}\\n', '0o600')
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], text: str, *, mode: int = 0o600) -> Path:
    """Replace ``path`` with ``text`` (UTF-8) atomically, creating its directory; the file gets ``mode``
    (default owner-only, like every file the service writes: SECURITY.md). Returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target
