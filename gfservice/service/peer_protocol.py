"""The peer protocol of torchrun/Slurm jobs without Ray: frames, the handshake, and the limits both sides share.

Frames are length-prefixed JSON (4 bytes big-endian, then UTF-8; NaN/Inf travel as the JSON constants
``NaN``/``Infinity``). **Handshake (protocol 3).** On accept the server sends a challenge ``{"hello":
"gfservice-peer", "version": 3, "nonce": N}``; the rank answers with who it is and a proof that it holds the
attempt's key (:func:`~gfservice.service.auth.peer_proof` over both nonces and its identity): ``{"hello",
"version", "run", "rank", "attempt", "nonce": M, "proof": P}``; the server answers ``{"ok": true, "proof": Q}``
(its own proof, so that a rank never reports to an impostor) or ``{"ok": false, "error": ...}`` and closes.
A node merger (:mod:`gfservice.hosting.node_merger`) adds ``"node": n`` to its hello (also under the proof): it
speaks for the ``n`` ranks ``rank .. rank + n - 1`` of its node, never for more than the server admits per node.
**Requests.** Then each request is a :class:`~gfservice.envelopes.Batch` and each answer a
:class:`~gfservice.envelopes.BatchAnswer`, plus ``"findings"`` whenever they changed. An empty request is a poll.
The server is :class:`gfservice.service.peer_server.PeerServer`; the ranks' side
:class:`gfservice.training.peer_sender.PeerSender`.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import struct
from typing import Any

from gfservice.service.auth import peer_proof, proof_matches
from gfservice.stats import STATISTICS

__all__ = ["BATCH_REPORTS", "BYTES_PER_NUMBER", "HELLO", "HELLO_CAP", "MAX_FRAME", "MAX_REREGISTER",
           "PEER_PROTOCOL", "PRE_LAYOUT_CAP", "FrameError", "HandshakeError", "decode_frame", "decode_request",
           "derived_attempt", "encode_frame", "frame_limit", "handshake", "hello_proof_parts", "read_frame",
           "speaks_for", "speaks_for_ranks"]

#: Largest frame a client helper reads (answers), and the hard ceiling of any derived limit.
MAX_FRAME = 256 * 2**20
#: What a hello says; a connection that says something else is refused.
HELLO = "gfservice-peer"
#: The peer protocol; 3 authenticates every connection (2 took a bare token; 1 answered ``"stop"`` bare).
PEER_PROTOCOL = 3
#: The largest hello.
HELLO_CAP = 4096
#: The largest request of an attempt whose layout is not known yet (a layout of a few thousand layers).
PRE_LAYOUT_CAP = 256 << 10
#: Reports in one request that :func:`frame_limit` allows for (a sender's ``batch_max`` is 32).
BATCH_REPORTS = 64
#: Bytes allowed per number of a report in JSON (``-1.2345678901234567e-308,`` is 24).
BYTES_PER_NUMBER = 32
#: Attempts a rank may re-register as after being told ``stale_attempt`` (see :func:`derived_attempt`).
MAX_REREGISTER = 3
_HEADER = struct.Struct(">I")
_DERIVED = re.compile(r"^(?P<base>.*)\.re(?P<n>[1-9])$")


class FrameError(ValueError):
    """A frame that is too big, cut short or not JSON."""


class HandshakeError(ConnectionError):
    """The other side refused the handshake, or could not prove it holds the key."""


def encode_frame(obj: Any) -> bytes:
    """``obj`` as one frame: its length (4 bytes, big-endian), then its JSON.

    >>> encode_frame({"a": float("nan")})
    b'\\x00\\x00\\x00\\t{"a":NaN}'
    """
    data = json.dumps(obj, allow_nan=True, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise FrameError(f"frame of {len(data)} bytes is over the limit of {MAX_FRAME}")
    return _HEADER.pack(len(data)) + data


def _read_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_frame(sock: socket.socket, max_bytes: int = MAX_FRAME) -> Any:
    """Read one frame from ``sock`` (blocking: the ranks' side); raises :class:`EOFError` at a clean end,
    :class:`FrameError` for a bad one."""
    (n,) = _HEADER.unpack(_read_exact(sock, _HEADER.size))
    if n > max_bytes:
        raise FrameError(f"frame of {n} bytes is over the limit of {max_bytes}")
    try:
        return decode_frame(_read_exact(sock, n))
    except EOFError:
        raise FrameError("frame cut short") from None


def decode_frame(data: bytes | bytearray) -> Any:
    """A small frame (a hello, an answer) as JSON."""
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FrameError(f"not JSON: {exc}") from None


_WS = re.compile(r"[ \t\n\r]*")


def decode_request(data: bytes | bytearray) -> dict[str, Any]:
    """A request frame as a dict, decoded one message at a time: the decoder never holds the GIL for longer
    than one message takes (rank 0's training thread runs between them), whatever the frame's size.

    >>> decode_request(b' {"run": "r", "messages": [{"kind": "step"}, {"x": NaN}] , "dropped": 0}')
    {'run': 'r', 'messages': [{'kind': 'step'}, {'x': nan}], 'dropped': 0}
    >>> decode_request(b'[1, 2]')
    Traceback (most recent call last):
    ...
    gfservice.service.peer_protocol.FrameError: a request must be a JSON object
    """
    try:
        text = data.decode("utf-8")
        return _parse_object(text, json.JSONDecoder())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, IndexError) as exc:
        raise FrameError(f"not JSON: {exc}") from None


def _parse_object(text: str, dec: json.JSONDecoder) -> dict[str, Any]:
    i = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if text[i:i + 1] != "{":
        raise FrameError("a request must be a JSON object")
    out: dict[str, Any] = {}
    i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
    if text[i:i + 1] == "}":
        return _end(text, i + 1, out)
    while True:
        key, i = dec.raw_decode(text, i)
        i = _WS.match(text, i).end()  # type: ignore[union-attr]
        if not isinstance(key, str) or text[i:i + 1] != ":":
            raise FrameError("not JSON: expected a key and ':'")
        i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
        if key == "messages" and text[i:i + 1] == "[":
            out[key], i = _parse_array(text, i + 1, dec)
        else:
            out[key], i = dec.raw_decode(text, i)
        i = _WS.match(text, i).end()  # type: ignore[union-attr]
        sep = text[i:i + 1]
        if sep == "}":
            return _end(text, i + 1, out)
        if sep != ",":
            raise FrameError("not JSON: expected ',' or '}'")
        i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]


def _parse_array(text: str, i: int, dec: json.JSONDecoder) -> tuple[list[Any], int]:
    items: list[Any] = []
    i = _WS.match(text, i).end()  # type: ignore[union-attr]
    if text[i:i + 1] == "]":
        return items, i + 1
    while True:
        item, i = dec.raw_decode(text, i)  # one message per call: the GIL is free between them
        items.append(item)
        i = _WS.match(text, i).end()  # type: ignore[union-attr]
        sep = text[i:i + 1]
        if sep == "]":
            return items, i + 1
        if sep != ",":
            raise FrameError("not JSON: expected ',' or ']'")
        i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]


def _end(text: str, i: int, out: dict[str, Any]) -> dict[str, Any]:
    if _WS.match(text, i).end() != len(text):  # type: ignore[union-attr]
        raise FrameError("not JSON: extra data after the request")
    return out


def frame_limit(layers: int, layout_bytes: int = 0) -> int:
    """The largest request an attempt with ``layers`` layers can need: its layout (``layout_bytes`` of JSON) and
    :data:`BATCH_REPORTS` reports of every statistic per layer, never under :data:`PRE_LAYOUT_CAP`.

    >>> frame_limit(0), frame_limit(1000) // 2**20
    (262144, 19)
    """
    per_report = layers * len(STATISTICS) * BYTES_PER_NUMBER + 2048
    return min(MAX_FRAME, max(PRE_LAYOUT_CAP, 2 * layout_bytes + BATCH_REPORTS * per_report + 65536))


def derived_attempt(attempt: str, generation: int) -> str:
    """The attempt a rank re-registers as after ``stale_attempt`` (the same on every rank of the job).

    >>> derived_attempt("a1", 0), derived_attempt("a1", 2), derived_attempt("a1.re2", 3)
    ('a1', 'a1.re2', 'a1.re3')
    """
    match = _DERIVED.match(attempt)
    base = match.group("base") if match else attempt
    return f"{base}.re{generation}" if generation else base


def speaks_for(attempt: Any, authenticated: str) -> bool:
    """Whether a message of ``attempt`` may come over a connection authenticated for ``authenticated`` (that
    attempt, or one it re-registered as).

    >>> speaks_for("a1", "a1"), speaks_for("a1.re1", "a1"), speaks_for("evil", "a1"), speaks_for(None, "a1")
    (True, True, False, False)
    """
    return isinstance(attempt, str) and derived_attempt(attempt, 0) == authenticated


def speaks_for_ranks(message: Any, covers: range) -> bool:
    """Whether every rank ``message`` speaks for (its ``rank``, a node layout's ``ranks``, a node report's
    ``node.ranks``) is among ``covers``, the ranks its connection authenticated for.

    >>> speaks_for_ranks({"rank": 2, "node": {"ranks": [2, 3]}}, range(2, 4))
    True
    >>> speaks_for_ranks({"rank": 2, "node": {"ranks": [2, 3]}}, range(2, 3))   # a rank forging its node
    False
    >>> speaks_for_ranks({"rank": 2, "ranks": "all"}, range(2, 4)), speaks_for_ranks({"rank": 0}, range(2, 4))
    (False, False)
    """
    if not isinstance(message, dict) or type(message.get("rank")) is not int or message["rank"] not in covers:
        return False
    node = message.get("node")
    for ranks in (message.get("ranks"), node.get("ranks") if isinstance(node, dict) else node):
        if ranks is None:
            continue
        if not (isinstance(ranks, list) and all(type(r) is int and r in covers for r in ranks)):
            return False
    return True


def hello_proof_parts(nonce: str, mine: str, run: str, rank: int, attempt: str, node: int = 1) -> tuple[Any, ...]:
    """What a rank's hello proves it holds the key over: both nonces and its identity (and ``node``, the ranks
    it speaks for, when over 1)."""
    return ("rank", nonce, mine, run, rank, attempt, *((node,) if node > 1 else ()))


def handshake(sock: socket.socket, key: bytes, run: str, rank: int, attempt: str, timeout_s: float = 10.0,
              node: int = 1) -> None:
    """The rank's side of the handshake on a connected blocking ``sock``; raises :class:`HandshakeError` when
    refused or when the server cannot prove it holds ``key``, :class:`OSError`/:class:`FrameError` when cut.
    ``node``: a node merger's connection speaks for the ``node`` ranks from ``rank`` on."""
    old = sock.gettimeout()
    sock.settimeout(timeout_s)
    try:
        challenge = read_frame(sock, HELLO_CAP)
        if not (isinstance(challenge, dict) and challenge.get("hello") == HELLO):
            raise HandshakeError("not a gfservice peer server")
        if challenge.get("version") != PEER_PROTOCOL:
            raise HandshakeError(f"peer protocol {challenge.get('version')!r}; this rank speaks {PEER_PROTOCOL}")
        nonce, mine = str(challenge.get("nonce")), secrets.token_hex(16)
        hello = {"hello": HELLO, "version": PEER_PROTOCOL, "run": run, "rank": rank, "attempt": attempt, "nonce": mine,
                 "proof": peer_proof(key, *hello_proof_parts(nonce, mine, run, rank, attempt, node))}
        sock.sendall(encode_frame({**hello, "node": node} if node > 1 else hello))
        answer = read_frame(sock, HELLO_CAP)
        if not (isinstance(answer, dict) and answer.get("ok") is True):
            raise HandshakeError(str(answer.get("error", answer)) if isinstance(answer, dict) else "bad answer")
        if not proof_matches(key, answer.get("proof"), "server", nonce, mine):
            raise HandshakeError("the server could not prove it holds this job's key (not this job's rank 0)")
    finally:
        sock.settimeout(old)
