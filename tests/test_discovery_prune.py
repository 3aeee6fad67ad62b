"""Discovery entries clean up after themselves (issue 22): withdrawn at exit, on SIGTERM/SIGINT (handlers chained,
never replaced) and by a watcher when the owner is killed outright; entries of dead owners (or of reused pids)
are removed by the next writer and by ``gfservice discovery prune``; other hosts' entries are left alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gfservice.observability.discovery import (
    OWNER_HOST,
    OWNER_PID,
    OWNER_START,
    owner_labels,
    prune_sd_files,
    withdraw_on_exit,
    write_sd_file,
)

ROOT = Path(__file__).resolve().parents[1]

OWNER = """
import signal, sys, time
from gfservice.observability.discovery import withdraw_on_exit, write_sd_file
path, mode = sys.argv[1], sys.argv[2]
if mode == "chained":
    def mine(signum, frame):
        print("own handler ran", flush=True)
        sys.exit(3)
    signal.signal(signal.SIGINT, mine)
withdraw_on_exit(write_sd_file(path, "127.0.0.1:1", {"launcher": "torchrun"}), watcher=mode == "watched")
print("ready", flush=True)
time.sleep(60)
"""


def _owner(path: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(path), mode], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    assert path.exists()
    return proc


def _gone(path: Path, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not path.exists():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_withdraws_the_entry_and_still_ends_the_process(tmp_path):
    path = tmp_path / "prometheus-sd-a.json"
    proc = _owner(path, "plain")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGTERM  # the default action still happens
    assert not path.exists()


def test_sigint_withdraws_the_entry_and_runs_the_handler_that_was_there(tmp_path):
    path = tmp_path / "prometheus-sd-b.json"
    proc = _owner(path, "chained")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 3 and "own handler ran" in out
    assert not path.exists()


def test_a_killed_owner_is_withdrawn_by_its_watcher(tmp_path):
    path = tmp_path / "prometheus-sd-c.json"
    proc = _owner(path, "watched")
    t0 = time.monotonic()
    proc.kill()  # SIGKILL: no handler runs (the OOM killer, scancel's last word)
    proc.communicate(timeout=10)
    assert _gone(path), "the watcher removed the entry of its dead owner"
    print(f"entry withdrawn {time.monotonic() - t0:.2f} s after SIGKILL")


def test_prune_removes_dead_and_reused_owners_only(tmp_path, capsys):
    dead = _owner(tmp_path / "prometheus-sd-dead.json", "plain")
    dead.kill()
    dead.communicate(timeout=10)
    assert (tmp_path / "prometheus-sd-dead.json").exists()  # no watcher: it stays behind
    reused = write_sd_file(tmp_path / "prometheus-sd-reused.json", "127.0.0.1:2", prune=False)
    entries = json.loads(reused.read_text())
    entries[0]["labels"][OWNER_START] = "another-boot:12"  # our pid, but not the process that wrote it
    reused.write_text(json.dumps(entries))
    other_host = tmp_path / "prometheus-sd-other.json"
    other_host.write_text(json.dumps([{"targets": ["gpu-7:1"], "labels": {
        OWNER_HOST: "gpu-7", OWNER_PID: str(dead.pid), OWNER_START: ""}}]))
    unowned = tmp_path / "prometheus-sd-legacy.json"
    unowned.write_text(json.dumps([{"targets": ["x:1"], "labels": {"service": "gfservice"}}]))
    live = write_sd_file(tmp_path / "prometheus-sd.json", "127.0.0.1:3", prune=False)

    assert [p.name for p, _ in prune_sd_files(tmp_path, dry_run=True)] == ["prometheus-sd-dead.json",
                                                                            "prometheus-sd-reused.json"]
    from gfservice.cli.main import main

    assert main(["discovery", "prune", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "prometheus-sd-dead.json: its owner, pid" in out and "has exited" in out
    assert "prometheus-sd-reused.json: pid" in out and "another process" in out
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted([other_host.name, unowned.name, live.name])


def test_the_next_writer_prunes_its_directory(tmp_path):
    dead = _owner(tmp_path / "prometheus-sd-host-1.json", "plain")
    dead.kill()
    dead.communicate(timeout=10)
    write_sd_file(tmp_path / "prometheus-sd.json", "127.0.0.1:4")  # what serve and every rank 0 do
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["prometheus-sd.json"]
    assert json.loads((tmp_path / "prometheus-sd.json").read_text())[0]["labels"][OWNER_PID] == str(os.getpid())


def test_no_handlers_are_installed_off_the_main_thread(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    done: list = []
    path = write_sd_file(tmp_path / "prometheus-sd-t.json", "127.0.0.1:5")
    thread = threading.Thread(target=lambda: done.append(withdraw_on_exit(path, watcher=False)))
    thread.start()
    thread.join()
    assert {s: signal.getsignal(s) for s in before} == before
    done[0].withdraw()
    assert not path.exists()


def test_handlers_are_put_back_after_a_withdrawal(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    w = withdraw_on_exit(write_sd_file(tmp_path / "prometheus-sd-u.json", "127.0.0.1:6"), watcher=False)
    assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
    w.withdraw()
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.slow
def test_peer_host_entries_carry_their_owner(tmp_path):
    from gfservice.config import Settings
    from gfservice.hosting.peer_host import PeerHost

    host = PeerHost(Settings(service={"sd_file": str(tmp_path / "prometheus-sd.json")}), tag="h-1",
                    announce=lambda line: None)
    try:
        assert host.sd_file is not None
        labels = json.loads(host.sd_file.read_text())[0]["labels"]
        assert {k: labels[k] for k in owner_labels()} == owner_labels() and labels["launcher"] == "torchrun"
    finally:
        host.close()
    assert not host.sd_file.exists()
