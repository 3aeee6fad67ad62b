"""The service's private, durable state: its own directory, and snapshots of plain data written atomically.

Directory: ``[service] state_dir`` (default ``$XDG_STATE_HOME/gfservice``, else ``~/.local/state/gfservice``),
created with mode 0700. A directory that is a symlink, is owned by another user or is writable by group or
others is refused with a :class:`StateDirError` that says why (anyone who can write there could plant a
snapshot or move the discovery file).

Snapshot format: one JSON document ``{"format": "gfservice-snapshot", "version": 1, "time": ..., "state": ...}``.
Nothing is ever unpickled. numpy arrays (detector state) are encoded explicitly as
``{"__ndarray__": dtype, "shape": [...], "data": base64}`` (object dtypes refused both ways); tuples, sets and
dicts with non-string keys have their own markers, so the aggregator's ``state_dict`` round-trips exactly.
One self-contained file rather than JSON plus an ``.npz`` beside it: a single rename replaces it atomically,
a crash can never leave the JSON and the arrays of two different snapshots side by side, and setting a bad
snapshot aside is one rename. The arrays are small (per-layer vectors), so base64's third more is cheap.

Reads refuse a state nested deeper than :data:`~gfservice.saved.SNAPSHOT_MAX_DEPTH` (a :class:`SnapshotError`,
never a ``RecursionError``); the aggregator validates what it restores as a :class:`~gfservice.saved.SnapshotState`.

Writes go to a unique temporary file in the same directory (``mkstemp``: ``O_EXCL``, ``O_NOFOLLOW``, mode 0600),
which is fsynced, then the current snapshot becomes ``<stem>.prev<suffix>``, the new one is renamed into place and
the directory is fsynced. Reads open with ``O_NOFOLLOW`` and accept only a regular file owned by this user.

>>> import numpy as np
>>> doc = decode(encode({"a": np.arange(3.0), "t": (1, 2), 5: {"x"}}))
>>> doc["a"], doc["t"], doc[5]
(array([0., 1., 2.]), (1, 2), {'x'})
"""

from __future__ import annotations

import base64
import errno
import json
import logging
import os
import stat
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from gfservice.errors import ConfigError
from gfservice.files import atomic_write
from gfservice.saved import DETECTOR_STATE_MAX_DEPTH, check_nesting

__all__ = ["FORMAT", "VERSION", "SnapshotError", "SnapshotTooNew", "StateDirError", "decode", "encode",
           "ensure_private_dir", "prev_path", "read_private_json", "read_snapshot", "set_aside",
           "write_private_json", "write_snapshot"]

log = logging.getLogger(__name__)

FORMAT = "gfservice-snapshot"
#: The snapshot format this gfservice writes and the newest it reads.
VERSION = 1
_MARKERS = ("__ndarray__", "__tuple__", "__set__", "__dict__")


class StateDirError(ConfigError):
    """The state directory (or a snapshot / discovery file's directory) is not private to this user."""


class SnapshotError(ValueError):
    """A snapshot file that cannot be read: corrupt, partial, or not a gfservice snapshot."""


class SnapshotTooNew(RuntimeError):
    """A snapshot written by a newer gfservice: refused, never overwritten."""


# ---- the directory ---------------------------------------------------------------------------------
def ensure_private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (mode 0700) if missing, then check it is private: a real directory (not a symlink)
    owned by this user and not writable by group or others. Returns the path; raises :class:`StateDirError`."""
    path = Path(path).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    if not os.path.lexists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
            os.chmod(path, 0o700)  # whatever the umask
        except FileExistsError:
            pass  # created meanwhile: checked below like any other
    st = os.lstat(path)
    uid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(f"gfservice state directory {path} is a symlink; refusing it (use the real path, "
                            "a directory of your own)")
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"gfservice state directory {path} is not a directory")
    if st.st_uid != uid:
        raise StateDirError(f"gfservice state directory {path} is owned by uid {st.st_uid}, not by this user "
                            f"(uid {uid}); refusing it: another user could plant a snapshot there. Use a "
                            "directory of your own ([service] state_dir)")
    if st.st_mode & 0o022:
        raise StateDirError(f"gfservice state directory {path} is writable by group or others (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); refusing it: run `chmod go-w {path}` or use "
                            "another directory ([service] state_dir)")
    return path


# ---- encoding --------------------------------------------------------------------------------------
def encode(obj: Any, where: str = "state") -> Any:
    """``obj`` as JSON-ready plain data (arrays, tuples, sets and non-string keys made explicit)."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise TypeError(f"{where}: numpy arrays of objects cannot be saved")
        arr = np.ascontiguousarray(obj)
        return {"__ndarray__": arr.dtype.str, "shape": list(arr.shape),
                "data": base64.b64encode(arr.tobytes()).decode("ascii")}
    if isinstance(obj, np.generic):
        return encode(obj.item(), where)
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
            return {k: encode(v, f"{where}.{k}") for k, v in obj.items()}
        return {"__dict__": [[encode(k, where), encode(v, f"{where}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, where) for v in obj]}
    if isinstance(obj, set | frozenset):
        return {"__set__": [encode(v, where) for v in obj]}
    if isinstance(obj, list | deque):
        return [encode(v, where) for v in obj]
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be saved in a snapshot (plain data and numpy only)")


def encode_detector_state(state: Any, where: str = "state") -> Any:
    """A detector's ``state_dict()`` as a snapshot holds it (:func:`encode`), with room for its place in the
    snapshot: ``TypeError`` for what cannot be saved, ``ValueError`` for a state nested too deep to restore. The
    service and the plugin kit (:func:`gfservice.testing.restored_state`) both save through this."""
    encoded = encode(state, where)
    check_nesting(encoded, DETECTOR_STATE_MAX_DEPTH)
    return encoded


def decode(obj: Any) -> Any:
    """The inverse of :func:`encode`; raises :class:`SnapshotError` on anything malformed."""
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__ndarray__" in obj:
        try:
            dtype = np.dtype(obj["__ndarray__"])
            if dtype.hasobject:
                raise SnapshotError("an array of objects in a snapshot")
            shape = tuple(int(n) for n in obj["shape"])
            return np.frombuffer(base64.b64decode(obj["data"], validate=True), dtype=dtype).reshape(shape).copy()
        except SnapshotError:
            raise
        except Exception as exc:
            raise SnapshotError(f"bad array in snapshot: {exc}") from None
    if len(obj) == 1:
        (key, val), = obj.items()
        if key in ("__tuple__", "__set__", "__dict__") and not isinstance(val, list):
            raise SnapshotError(f"bad {key} in snapshot")
        try:
            if key == "__tuple__":
                return tuple(decode(v) for v in val)
            if key == "__set__":
                return {decode(v) for v in val}
            if key == "__dict__":
                return {decode(k): decode(v) for k, v in val}
        except (TypeError, ValueError) as exc:
            raise SnapshotError(f"bad {key} in snapshot: {exc}") from None
    return {k: decode(v) for k, v in obj.items()}


# ---- files -----------------------------------------------------------------------------------------
def prev_path(path: str | os.PathLike[str]) -> Path:
    """Where the previous snapshot is kept: ``snapshot.json`` -> ``snapshot.prev.json``."""
    p = Path(path)
    return p.with_name(f"{p.stem}.prev{p.suffix or '.json'}")


def write_snapshot(path: str | os.PathLike[str], state: Mapping[str, Any], now: float | None = None) -> Path:
    """Write ``state`` atomically to ``path``, keeping the one it replaces as :func:`prev_path`."""
    target = Path(path)
    directory = ensure_private_dir(target.parent)
    text = json.dumps({"format": FORMAT, "version": VERSION, "time": time.time() if now is None else now,
                       "state": encode(state)}, separators=(",", ":"))
    return atomic_write(directory / target.name, text, previous=prev_path(target), sync_dir=True)


def write_private_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically, mode 0600, in a private directory (markers and the like).

    >>> import tempfile, stat
    >>> p = write_private_json(Path(tempfile.mkdtemp()) / "d" / "m.json", {"a": 1})
    >>> read_private_json(p), oct(stat.S_IMODE(p.stat().st_mode))
    ({'a': 1}, '0o600')
    """
    target = Path(path)
    directory = ensure_private_dir(target.parent)
    return atomic_write(directory / target.name, json.dumps(obj))


def _read_own_file(path: str | os.PathLike[str]) -> bytes:
    """The bytes of ``path``, a regular file of this user opened without following a symlink;
    ``FileNotFoundError`` when missing, :class:`SnapshotError` otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SnapshotError(f"{path} is a symlink; not following it") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise SnapshotError(f"{path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise SnapshotError(f"{path} is owned by uid {st.st_uid}, not by this user")
        return fh.read()


def read_private_json(path: str | os.PathLike[str]) -> Any:
    """The JSON in ``path``, a regular file of this user (not a symlink); ``FileNotFoundError`` when missing,
    :class:`SnapshotError` when it is not this user's or not JSON."""
    raw = _read_own_file(path)
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SnapshotError(f"{path} is not JSON ({exc})") from None


def read_snapshot(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The saved document at ``path`` (``state`` decoded), or :class:`FileNotFoundError`.

    Raises :class:`SnapshotError` for anything that is not a whole gfservice snapshot (set it aside) and
    :class:`SnapshotTooNew` for a snapshot of a newer format (leave it alone)."""
    raw = _read_own_file(path)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: nested past the stack
        raise SnapshotError(f"{path} is not a JSON snapshot ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("version"), int):
        raise SnapshotError(f"{path} is not a gfservice snapshot (unknown format)")
    if doc["version"] > VERSION:
        raise SnapshotTooNew(f"{path} was written by a newer gfservice (snapshot format {doc['version']}; this "
                             f"one reads up to {VERSION}); refusing to start over it: upgrade gfservice, or move "
                             "the file away to start empty")
    if not isinstance(doc.get("state"), dict):
        raise SnapshotError(f"{path} has no state")
    try:
        check_nesting(doc["state"])  # before decode, which recurses
    except ValueError as exc:
        raise SnapshotError(f"{path}: the saved state is {exc}") from None
    doc["state"] = decode(doc["state"])
    return doc


def set_aside(path: str | os.PathLike[str], why: str) -> Path | None:
    """Rename a bad snapshot to ``<stem>.corrupt-<time><suffix>`` (never overwriting one); returns the new name."""
    p = Path(path)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    for i in range(100):
        dest = p.with_name(f"{p.stem}.corrupt-{stamp}{'' if i == 0 else f'-{i}'}{p.suffix or '.json'}")
        if os.path.lexists(dest):
            continue
        try:
            os.link(p, dest, follow_symlinks=False)  # fails instead of replacing an existing file
        except FileExistsError:
            continue
        except OSError:
            try:
                os.rename(p, dest)
            except OSError:
                log.exception("gfservice could not set aside %s", p)
                return None
        else:
            os.unlink(p)
        log.error("gfservice set aside snapshot %s as %s: %s", p, dest, why)
        return dest
    return None
