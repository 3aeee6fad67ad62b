"""What a holder of the service's actor handle can call (issue 22): Ray's built-in actor methods are the
service's own (``__ray_call__`` refused, ``__ray_terminate__`` with the token only, ``__init__`` once), and the
service comes back after its process is killed. A real local Ray (the session's cluster, see conftest.py)."""

from __future__ import annotations

import time
import uuid

import pytest
import ray

from gfservice.config import Settings
from gfservice.hosting import actor as svc

pytestmark = [pytest.mark.ray]
TOKEN = "gf-builtins-" + uuid.uuid4().hex


def _refused(ref) -> str:
    with pytest.raises(Exception) as caught:  # Ray wraps the actor's exception
        ray.get(ref, timeout=60)
    return repr(caught.value)


@pytest.fixture
def guarded(ray_cluster, tmp_path):
    name, namespace = f"gf-builtins-{uuid.uuid4().hex[:8]}", "gf-builtins"
    settings = Settings.model_validate({"service": {"state_dir": str(tmp_path), "metrics_port": None,
                                                    "name": name, "namespace": namespace}})
    handle, created = svc.start(settings, token=TOKEN)
    assert created
    yield handle
    svc.stop(name, namespace, token=TOKEN)


def test_a_handle_holder_cannot_run_code_terminate_or_reinitialise_the_service(guarded):
    lay = {"kind": "layout", "run": "secret", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [2],
           "sharded": [False]}
    assert ray.get(guarded.submit.remote([lay], token=TOKEN), timeout=60)["rejected"] == []
    assert "PermissionError" in _refused(guarded.__ray_call__.remote(lambda self: self._core.runs()))
    assert "PermissionError" in _refused(guarded.__ray_call__.remote(lambda self: setattr(self, "_guard", None)))
    assert "Unauthorized" in _refused(guarded.__ray_terminate__.remote())
    assert ray.get(guarded.__ray_ready__.remote(), timeout=60) is True
    # the guard still holds, and the service still runs with its run
    assert "Unauthorized" in _refused(guarded.runs.remote())
    assert [r["run"] for r in ray.get(guarded.runs.remote(token=TOKEN), timeout=60)] == ["secret"]


def _back(guarded) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            assert ray.get(guarded.ping.remote(), timeout=10) == "pong"
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    while True:  # a call right after the restart can still meet the restart itself (ActorUnavailableError)
        answer = _refused(guarded.runs.remote())
        if "Unavailable" not in answer or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "Unauthorized" in answer, "the restarted service keeps its token"


def test_the_service_comes_back_after_its_process_is_killed(guarded):
    ray.kill(guarded, no_restart=False)  # what a crash or an OOM kill does; Ray restarts it (max_restarts=-1)
    _back(guarded)


def test_calling_init_through_the_handle_neither_replaces_the_guard_nor_ends_the_service(guarded):
    init = guarded._method_shells["__init__"].bind(guarded)  # the actor's __init__ is in Ray's method table
    _refused(init.remote({}, None))  # Ray 2.60's worker exits on it (an internal error): a crash, restarted
    _back(guarded)
