"""The optional service token: who may submit to the service and ask it about runs.

The token is read from ``$GFSERVICE_TOKEN``, else from the file named by ``[service] token_file``
(``$GFSERVICE_SERVICE__TOKEN_FILE``), which must be a regular file of this user that nobody else may read or
write (mode 0600 or 0400). The service keeps only the token's SHA-256 digest (what Ray stores with the actor),
and compares digests with :func:`hmac.compare_digest`. Without a token the service takes every caller, as
before: the Ray cluster's own authentication is then the boundary (see SECURITY.md).

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "token")
>>> fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
>>> _ = os.write(fd, b"s3cret\\n"); os.close(fd)
>>> load_token(path, environ={})
's3cret'
>>> load_token(None, environ={"GFSERVICE_TOKEN": "from-env"})   # the variable wins over the file
'from-env'
>>> load_token(None, environ={}) is None                          # no token: the service takes every caller
True
>>> guard = Guard(digest("s3cret"))
>>> guard.allows("s3cret"), guard.allows("wrong"), guard.allows(None), Guard(None).allows(None)
(True, False, False, True)
>>> guard.check(None, "status")
Traceback (most recent call last):
...
gfservice.service.auth.Unauthorized: unauthorized: status needs the gfservice service token, and none was ...
>>> os.chmod(path, 0o644)
>>> load_token(path, environ={})
Traceback (most recent call last):
...
gfservice.service.auth.TokenFileError: gfservice token file ... is readable or writable by group or others ...
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gfservice.errors import ConfigError

__all__ = ["HOW_TO_PASS", "TOKEN_ENV", "TOKEN_FILE_ENV", "Guard", "TokenFileError", "Unauthorized", "digest",
           "load_token", "new_job_secret", "peer_key", "peer_proof", "proof_matches", "read_token_file"]

#: The variable that holds the token itself (read by the service, the senders, ``connect()`` and the CLI).
TOKEN_ENV = "GFSERVICE_TOKEN"
#: The variable that names a token file (the ``[service] token_file`` setting).
TOKEN_FILE_ENV = "GFSERVICE_SERVICE__TOKEN_FILE"
#: How a caller passes the token: part of every refusal.
HOW_TO_PASS = (f"set {TOKEN_ENV} to the token, or {TOKEN_FILE_ENV} to a file of yours (mode 0600) holding it, "
               "in the calling process (a training job: in its workers' environment), or pass "
               "gfservice.connect(token=...)")
#: Longest token accepted (a token is a secret string, not a document).
MAX_TOKEN_CHARS = 4096


class TokenFileError(ConfigError):
    """The token file is missing, not private to this user, or holds no token."""


class Unauthorized(PermissionError):
    """The service has a token and the caller presented none, or a wrong one."""


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in ``path``: a regular file (not a symlink) owned by this user, mode 0600 or stricter."""
    path = Path(path).expanduser()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        raise TokenFileError(f"gfservice token file {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise TokenFileError(f"gfservice token file {path} is a symlink; refusing it (name the file "
                                 "itself)") from None
        raise TokenFileError(f"gfservice token file {path} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise TokenFileError(f"gfservice token file {path} is not a regular file")
        if st.st_uid != os.geteuid():
            raise TokenFileError(f"gfservice token file {path} is owned by uid {st.st_uid}, not by this user "
                                 f"(uid {os.geteuid()}); refusing it")
        if st.st_mode & 0o077:
            raise TokenFileError(f"gfservice token file {path} is readable or writable by group or others (mode "
                                 f"{stat.S_IMODE(st.st_mode):04o}); refusing it: run `chmod 600 {path}`")
        raw = fh.read(MAX_TOKEN_CHARS + 2)
    try:
        token = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"gfservice token file {path} is not UTF-8 text") from None
    return _valid(token, f"gfservice token file {path}")


def _valid(token: str, where: str) -> str:
    if not token:
        raise TokenFileError(f"{where} holds no token (it is empty)")
    if len(token) > MAX_TOKEN_CHARS:
        raise TokenFileError(f"{where}: the token is longer than {MAX_TOKEN_CHARS} characters")
    return token


def load_token(token_file: str | os.PathLike[str] | None = None,
               environ: Mapping[str, str] | None = None) -> str | None:
    """The token from ``$GFSERVICE_TOKEN``, else ``token_file``, else ``$GFSERVICE_SERVICE__TOKEN_FILE``;
    ``None`` when none is set. Raises :class:`TokenFileError` for a file that is set but not usable."""
    env = os.environ if environ is None else environ
    value = env.get(TOKEN_ENV, "").strip()
    if value:
        return _valid(value, f"${TOKEN_ENV}")
    path = token_file or env.get(TOKEN_FILE_ENV, "")
    return read_token_file(path) if path else None


def digest(token: str) -> str:
    """The SHA-256 hex digest the service keeps instead of the token.

    >>> digest("abc")[:16]
    'ba7816bf8f01cfea'
    """
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()  # a hostile string never raises


class Guard:
    """Checks what a caller presents against the service's token digest (``None``: no token, all allowed)."""

    def __init__(self, token_digest: str | None):
        self.token_digest = token_digest

    @property
    def enabled(self) -> bool:
        return self.token_digest is not None

    def allows(self, presented: Any) -> bool:
        """Whether ``presented`` is the token (constant-time comparison of digests)."""
        if self.token_digest is None:
            return True
        if not isinstance(presented, str) or len(presented) > MAX_TOKEN_CHARS:
            return False
        return hmac.compare_digest(digest(presented), self.token_digest)

    def check(self, presented: Any, call: str) -> None:
        """Raise :class:`Unauthorized`, saying how to pass the token, unless ``presented`` is allowed."""
        if not self.allows(presented):
            what = "none was presented" if presented is None else "the one presented is wrong"
            raise Unauthorized(f"unauthorized: {call} needs the gfservice service token, and {what}: {HOW_TO_PASS}")


# ---- the peer path's per-job key (torchrun/Slurm without Ray; see gfservice.service.peer_server) -------------
def new_job_secret() -> str:
    """A fresh per-job secret (256 random bits, hex): rank 0 makes one per attempt and shares it through the job's
    rendezvous store."""
    return secrets.token_hex(32)


def peer_key(secret: str, token: str | None = None) -> bytes:
    """The key a rank proves it holds: the job's ``secret``, bound to ``token`` (``$GFSERVICE_TOKEN``) when one is
    set, so that a process that can read the store but was not given the token cannot join either.

    >>> peer_key("ab") == peer_key("ab"), peer_key("ab") == peer_key("ab", "tok")
    (True, False)
    """
    material = secret.encode()
    if token:
        return hmac.new(token.encode("utf-8", "surrogatepass"), material, hashlib.sha256).digest()
    return hashlib.sha256(material).digest()


def peer_proof(key: bytes, *parts: object) -> str:
    """HMAC-SHA256 over ``parts`` (joined unambiguously): what a side sends to prove it holds ``key``.

    >>> p = peer_proof(b"k", "client", "n1", 0)
    >>> proof_matches(b"k", p, "client", "n1", 0), proof_matches(b"k", p, "client", "n1", 1)
    (True, False)
    >>> proof_matches(b"k", 17, "client")        # not even a string
    False
    """
    body = "\x1f".join(f"{len(s)}:{s}" for s in map(str, parts))
    return hmac.new(key, body.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def proof_matches(key: bytes, presented: Any, *parts: object) -> bool:
    """Whether ``presented`` is :func:`peer_proof` of ``parts`` under ``key`` (constant-time)."""
    if not isinstance(presented, str) or len(presented) != 64:
        return False
    return hmac.compare_digest(presented.encode("ascii", "replace"), peer_proof(key, *parts).encode())
