"""``gfservice.connect()``: ask the running service about runs, findings and merged steps.

>>> import gfservice
>>> gfservice.connect(address="127.0.0.1:1")   # doctest: +SKIP
Traceback (most recent call last):
ConnectionError: ...
"""

from __future__ import annotations

from typing import Any

from gfservice.api import Finding, StepStats
from gfservice.config import DEFAULT_NAME, DEFAULT_NAMESPACE
from gfservice.errors import ConfigError
from gfservice.service import auth
from gfservice.service.ray_cluster import attach_ray


class Client:
    """A handle on the service; every call is a Ray actor call with a timeout, carrying ``token`` (the service
    token, when the service has one). A refused call raises :class:`~gfservice.service.auth.Unauthorized` (a
    ``PermissionError``) that says how to pass the token."""

    def __init__(self, handle, timeout_s: float = 30.0, token: str | None = None):
        self.handle = handle
        self.timeout_s = timeout_s
        self.token = token

    def _call(self, method: str, *args):
        import ray

        kwargs = {"token": self.token} if self.token is not None else {}
        try:
            return ray.get(getattr(self.handle, method).remote(*args, **kwargs), timeout=self.timeout_s)
        except PermissionError as exc:  # Ray wraps the service's refusal: raise it plainly, without traceback
            raise auth.Unauthorized(*getattr(exc, "cause", exc).args) from None

    def runs(self) -> list[dict[str, Any]]:
        """One row per run: last step, world size, active findings, whether it finished."""
        return self._call("runs")

    def findings(self, run: str, since_step: int = 0, active_only: bool = False) -> list[Finding]:
        return self._call("findings", run, since_step, active_only)

    def latest(self, run: str) -> StepStats | None:
        """The last merged step of ``run`` (per-layer statistics in ``.grads``)."""
        return self._call("latest", run)

    def history(self, run: str) -> list[StepStats]:
        return self._call("history", run)

    def status(self) -> dict[str, Any]:
        """The service's :class:`~gfservice.envelopes.ServiceStatus` as plain data (``gfservice status --json``)."""
        return self._call("status")

    def configure(self, run: str, settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Change the detectors of the live ``run`` from its next step on: ``settings`` maps detector names to
        the fields to set. Returns what changed and from which step; raises ``ConfigError`` (naming the
        detector and field) or ``KeyError`` (unknown run) as the service does.
        """
        try:
            return self._call("configure", run, settings)
        except Exception as exc:  # Ray wraps the service's exception: raise the service's own, without traceback
            cause = getattr(exc, "cause", None)
            if isinstance(cause, ConfigError | KeyError):
                raise type(cause)(*cause.args) from None
            raise

    def submit(self, messages: list[Any]) -> dict[str, Any]:
        """Send raw messages (tests and tools); training jobs use ``gfservice.monitor``. Answers a
        :class:`~gfservice.envelopes.BatchAnswer` as plain data."""
        return self._call("submit", messages)


def find(name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE):
    """The running service's actor handle, or ``None`` (found by name: whichever gfservice version started it)."""
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        return None


def attach(address: str | None = None) -> None:
    """Attach this process to a Ray cluster (``address``, ``$RAY_ADDRESS`` or the local one) if not yet."""
    attach_ray(address)


def connect(address: str | None = None, name: str = DEFAULT_NAME, namespace: str = DEFAULT_NAMESPACE,
            timeout_s: float = 30.0, token: str | None = None) -> Client:
    """A :class:`Client` for the service on the Ray cluster at ``address`` (default: the one running here).

    ``token``: the service token, if the service has one (default ``$GFSERVICE_TOKEN``, else the file named by
    ``$GFSERVICE_SERVICE__TOKEN_FILE``).
    """
    if token is None:
        token = auth.load_token()
    attach(address)
    handle = find(name, namespace)
    if handle is None:
        raise ConnectionError(
            f"no gfservice service named {namespace}/{name} on this Ray cluster; start one with `gfservice serve`"
        )
    return Client(handle, timeout_s, token)
