"""The trust boundary (SECURITY.md): the optional service token on the real Ray actor, Ray's own token
authentication named as such, `stop --ray` leaving a Ray it did not start alone, `grafana push` never showing
credentials, and owner-only files."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gfservice.config import ServiceConfig, Settings
from gfservice.hosting.actor import ServiceHost
from gfservice.service import auth
from gfservice.service.state import set_aside, write_private_json
from gfservice.wire import parse

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "gf-test-token-" + uuid.uuid4().hex


def _private_file(path: Path, text: str, mode: int = 0o600) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    os.write(fd, text.encode())
    os.close(fd)
    os.chmod(path, mode)
    return path


def test_token_file_must_be_private_and_hold_a_token(tmp_path):
    good = _private_file(tmp_path / "token", f"  {TOKEN}\n")
    assert auth.load_token(good, environ={}) == TOKEN
    assert auth.load_token(None, environ={auth.TOKEN_FILE_ENV: str(good)}) == TOKEN
    for mode in (0o640, 0o604, 0o660):
        os.chmod(good, mode)
        with pytest.raises(auth.TokenFileError, match="chmod 600"):
            auth.load_token(good, environ={})
    os.chmod(good, 0o400)
    assert auth.load_token(good, environ={}) == TOKEN
    with pytest.raises(auth.TokenFileError, match="empty"):
        auth.load_token(_private_file(tmp_path / "empty", "\n"), environ={})
    (tmp_path / "link").symlink_to(good)
    with pytest.raises(auth.TokenFileError, match="symlink"):
        auth.load_token(tmp_path / "link", environ={})
    with pytest.raises(auth.TokenFileError, match="does not exist"):
        auth.load_token(tmp_path / "missing", environ={})


@given(st.text(min_size=1, max_size=40), st.one_of(st.none(), st.text(max_size=40), st.integers(), st.binary()))
def test_only_the_token_itself_passes_the_guard(token, presented):
    guard = auth.Guard(auth.digest(token))
    assert guard.allows(token) and not guard.allows(token + "x")
    assert guard.allows(presented) is (presented == token)
    if presented != token:
        with pytest.raises(auth.Unauthorized, match="GFSERVICE_TOKEN"):
            guard.check(presented, "status()")


def test_every_file_the_service_writes_is_owner_only(tmp_path):
    state = tmp_path / "state"
    core = ServiceHost(Settings(service={"state_dir": str(state), "metrics_port": 0, "snapshot_interval_s": 60}))
    try:
        core.submit([{"kind": "layout", "run": "m", "rank": 0, "world_size": 1, "layers": ["w"], "numel": [2],
                      "sharded": [False]}])
        assert core.snapshot() and core.snapshot()  # the second write keeps the first as snapshot.prev.json
        write_private_json(state / "ray-head.json", {"session_name": "s"})
        set_aside(state / "snapshot.prev.json", "test")
        names = sorted(p.name for p in state.iterdir())
        assert "prometheus-sd.json" in names and "snapshot.json" in names and len(names) == 4, names
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()}
        assert all(m == 0o600 for m in modes.values()), {n: oct(m) for n, m in modes.items()}
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
    finally:
        core.shutdown()


# ---- the real Ray actor ----------------------------------------------------------------------------------------
def _messages(run: str) -> list:
    return [parse({"kind": "layout", "run": run, "rank": 0, "world_size": 1, "layers": ["w"], "numel": [2],
                   "sharded": [False]}),
            parse({"kind": "step", "run": run, "rank": 0, "step": 0,
                   "stats": {"count": [2], "sum_sq": [1.0], "max_abs": [1.0], "nonfinite": [0]}})]


def _send_all(sender, run: str) -> None:
    for msg in _messages(run):
        sender.send(msg)
    deadline = time.monotonic() + 30
    while sender.sent < 2 or not sender.flush(1.0):
        assert time.monotonic() < deadline, "the sender did not deliver its batch"


@pytest.mark.ray
def test_a_service_with_a_token_refuses_and_counts_callers_without_it(ray_cluster, tmp_path, monkeypatch, capsys):
    from gfservice.cli.main import main
    from gfservice.hosting import actor as svc
    from gfservice.service.client import Client, connect
    from gfservice.training.ray_sender import RaySender

    name, namespace = f"gf-token-{uuid.uuid4().hex[:8]}", "gf-token"
    settings = Settings(service=ServiceConfig(name=name, namespace=namespace, state_dir=str(tmp_path / "state")))
    handle, created = svc.start(settings, token=TOKEN)
    assert created
    try:
        anonymous = RaySender(handle, "tok", linger_s=0.01)
        _send_all(anonymous, "tok")
        anonymous.close()
        assert anonymous.rejected == {"unauthorized": 2} and anonymous.dropped == 2

        trusted = RaySender(handle, "tok", linger_s=0.01, token=TOKEN)
        _send_all(trusted, "tok")
        assert trusted.rejected == {}
        assert trusted.latest("tok").step == 0, "queries carry the token too"
        trusted.close()

        status = Client(handle, token=TOKEN).status()
        assert status["auth"] == "token"
        assert status["counters"]["rejected"].get("unauthorized") == 2
        assert status["counters"]["accepted"] == 2 and [r["run"] for r in status["runs"]] == ["tok"]

        for client in (Client(handle), Client(handle, token="wrong")):
            for call in (client.status, client.runs, lambda c=client: c.findings("tok"),
                         lambda c=client: c.latest("tok"), lambda c=client: c.history("tok"),
                         lambda c=client: c.configure("tok", {})):
                with pytest.raises(PermissionError, match="GFSERVICE_TOKEN") as refused:
                    call()
                assert type(refused.value) is auth.Unauthorized and "Traceback" not in str(refused.value)
        with pytest.raises(PermissionError, match="shutdown"):
            svc.stop(name, namespace, token="wrong")
        assert ray_cluster.get(handle.ping.remote()) == "pong", "a refused stop leaves the service running"
        for command in ("status", "stop"):  # the command line says so too, without a traceback
            assert main([command, "--name", name, "--namespace", namespace]) == 1
            err = capsys.readouterr().err
            assert err.startswith("gfservice: error: unauthorized") and "GFSERVICE_TOKEN" in err, err

        monkeypatch.setenv(auth.TOKEN_ENV, TOKEN)  # connect() reads the token like the senders do
        assert connect(name=name, namespace=namespace).findings("tok") == []
        assert svc.stop(name, namespace)
    finally:
        left = svc.find(name, namespace)  # once: a stopping actor may be gone by a second look
        if left is not None:
            ray_cluster.kill(left, no_restart=True)


@pytest.mark.ray
@pytest.mark.slow
def test_serve_against_a_ray_with_token_auth_says_what_failed_and_how_to_pass_the_token(ray_cluster):
    from gfservice.service.ray_cluster import gcs_requires_token

    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        pytest.skip("the session's Ray cluster runs without token authentication (RAY_AUTH_MODE)")
    gcs = ray_cluster.get_runtime_context().gcs_address
    assert gcs_requires_token(gcs)
    assert not gcs_requires_token("127.0.0.1:1"), "nothing listening is not an authentication failure"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "GFSERVICE_"))}
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "gfservice", "serve", "--address", gcs, "--name", "gf-never"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1, done
    assert "requires Ray's token authentication (InvalidAuthToken)" in done.stderr, done.stderr
    assert "RAY_AUTH_MODE=token" in done.stderr and "RAY_AUTH_TOKEN" in done.stderr
    assert "no Ray cluster" not in done.stderr
    assert time.monotonic() - t0 < 15, "fails at once instead of after Ray's 20 s of retries"


@pytest.mark.ray
def test_stop_ray_leaves_a_ray_that_serve_did_not_start(ray_cluster, tmp_path, monkeypatch, capsys):
    from gfservice.cli.main import main
    from gfservice.cli.service_commands import RAY_MARKER, ray_started_by_serve

    state = tmp_path / "state"
    monkeypatch.setenv("GFSERVICE_SERVICE__STATE_DIR", str(state))
    args = ["stop", "--ray", "--name", "gf-absent", "--namespace", "gf-absent"]
    assert main(args) == 0
    assert "this Ray was not started by gfservice serve (no record of one" in capsys.readouterr().out
    write_private_json(state / RAY_MARKER, {"session_name": "session_2000-01-01_00-00-00_000000_1"})
    assert main(args) == 0
    assert "names another Ray session" in capsys.readouterr().out
    assert ray_cluster.is_initialized() and ray_cluster.get(ray_cluster.put(1)) == 1, "Ray still runs"
    write_private_json(state / RAY_MARKER, {"session_name": ray_cluster.get_runtime_context().get_session_name()})
    assert ray_started_by_serve(state / RAY_MARKER) == (True, "")


def test_grafana_push_never_prints_credentials_and_warns_before_plain_http(capsys):
    from gfservice.cli.grafana import push_main

    secret, token = "pw-" + uuid.uuid4().hex, "glsa_" + uuid.uuid4().hex
    for host, warned in (("127.0.0.1", False), ("0.0.0.0", True)):  # nothing listens on port 1 of either
        assert push_main(["push", "--url", f"http://admin:{secret}@{host}:1", "--token", token, "--timeout", "2",
                          "--no-alerts"]) == 1
        out, err = capsys.readouterr()
        assert secret not in out + err and token not in out + err and "admin" not in out + err
        assert f"cannot reach Grafana at http://{host}:1" in err, err
        assert ("warning: sending the Grafana token over plain http" in err) is warned, err
