"""The one way gfservice attaches to Ray, or starts it: used by the monitor, the client, the CLI and the demo.

Ray is imported inside the function, so importing this module costs nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

#: What to do when no cluster answers: fail, start a local head that outlives this process
#: (``ray start --head``, for ``gfservice serve``), or start Ray inside this process (the demo).
Start = Literal["never", "head", "embedded"]


class RayAuthError(ConnectionError):
    """The Ray cluster answered, but refused this process: Ray's token authentication is on and the token this
    process sent (if any) is missing or wrong (Ray's ``InvalidAuthToken``)."""


#: Ray's variables for its token authentication (ray 2.60: on by default for clusters started after a token
#: exists, e.g. ``ray start --head`` once ``~/.ray/auth_token`` is there).
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
RAY_TOKEN_HELP = ("pass the cluster's Ray token: `export RAY_AUTH_MODE=token` (Ray never sends a token to an explicit "
                  "address without it) and either RAY_AUTH_TOKEN=<token>, RAY_AUTH_TOKEN_PATH=<file holding it>, or "
                  "the file ~/.ray/auth_token (`ray get-auth-token` on the head node prints the token); see "
                  "https://docs.ray.io/en/latest/ray-security/token-auth.html")


def auth_error_message(target: str, sends_token: bool) -> str:
    """What to say when the cluster at ``target`` refused this process's Ray token.

    >>> msg = auth_error_message("10.0.0.5:6379", sends_token=False)
    >>> msg[:89]
    "the Ray cluster at '10.0.0.5:6379' requires Ray's token authentication (InvalidAuthToken)"
    >>> "sent no token" in msg and "RAY_AUTH_MODE=token" in msg and "RAY_AUTH_TOKEN=" in msg
    True
    """
    what = "sent a token it refused" if sends_token else "sent no token"
    return (f"the Ray cluster at {target!r} requires Ray's token authentication (InvalidAuthToken) and this process "
            f"{what}: {RAY_TOKEN_HELP}")


def gcs_requires_token(address: str, timeout_s: float = 3.0) -> bool:
    """Whether the Ray GCS at ``host:port`` refuses a request without a token (``UNAUTHENTICATED``): one raw gRPC
    call, no Ray client. ``False`` when it answers, or when nothing answers."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:  # not a GCS address (e.g. a ray:// client address)
        return False
    import grpc  # type: ignore[import-untyped]

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")
        try:
            call(b"", timeout=timeout_s)  # an empty GetClusterIdRequest
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    return False


def _sends_token() -> bool:
    return os.environ.get(RAY_AUTH_MODE_ENV, "").strip().lower() == "token"


def attach_ray(address: str | None = None, *, start: Start = "never", namespace: str | None = None,
               num_cpus: int | None = None) -> bool:
    """Attach this process to the Ray cluster at ``address`` (default ``$RAY_ADDRESS``, else the one running
    on this machine), or start one as ``start`` says. Does nothing when Ray is already initialised.

    Returns ``True`` when it started a local head (``start="head"``) that outlives this process.
    Raises :class:`RayAuthError` when the cluster refuses this process's Ray token (it says how to pass it), and
    :class:`ConnectionError` with what to do when no cluster answers and ``start`` is ``"never"`` (or an explicit
    ``address`` does not answer).
    """
    import ray

    if ray.is_initialized():
        return False
    explicit = address or os.environ.get("RAY_ADDRESS")
    if start == "embedded" and not explicit:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 namespace=namespace)
        return False
    target = explicit or "auto"
    if explicit and not _sends_token() and gcs_requires_token(explicit):
        raise RayAuthError(auth_error_message(explicit, sends_token=False))  # fails at once, not after Ray's 20 s
    try:
        ray.init(address=target, log_to_driver=False, logging_level=logging.ERROR, namespace=namespace)
        return False
    except ConnectionError as exc:
        if explicit and gcs_requires_token(explicit):
            raise RayAuthError(auth_error_message(explicit, sends_token=_sends_token())) from None
        if explicit or start == "never":
            raise ConnectionError(
                f"no Ray cluster at {target!r} ({exc}); start one with `gfservice serve` or `ray start --head`"
            ) from None
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    print("no Ray cluster here: starting a local head (ray start --head)", flush=True)
    subprocess.run([ray_bin, "start", "--head", "--include-dashboard=false", "--disable-usage-stats"],
                   check=True, stdout=subprocess.DEVNULL)
    ray.init(address="auto", log_to_driver=False, logging_level=logging.ERROR, namespace=namespace)
    return True


def ray_reachable() -> bool:
    """Whether a monitor should look for a service: Ray is initialised here, or ``$RAY_ADDRESS`` names a
    cluster. (A monitor never probes for a cluster on its own: training must not wait on a guess.)"""
    if os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())
