"""The embedded redis-server: AUTH, and removal on every way its launcher can end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from queue_helpers import REPO, Replica

from reward_servers.errors import UserError
from reward_servers.queue.embedded import EmbeddedRedis
from reward_servers.queue.protocol import connect

LAUNCHER = """
import signal
import sys
from reward_servers.queue.embedded import EmbeddedRedis
# Ctrl-C as in a terminal: a process started from a non-interactive shell's background job inherits
# SIGINT ignored, and Python then raises no KeyboardInterrupt.
signal.signal(signal.SIGINT, signal.default_int_handler)
with EmbeddedRedis() as server:
    print(server.process.pid, server.folder, flush=True)
    sys.stdin.readline()  # "exit": the test closes stdin; otherwise a signal ends the wait
"""


def _gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return True
        if "\nState:\tZ" in state:  # exited, awaiting its reaper
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("ending", ["exit", "sigint", "sigterm", "sigkill"])
def test_embedded_redis_is_removed_when_its_launcher_ends(ending):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, ending],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    pid_text, folder = launcher.stdout.readline().split()
    pid = int(pid_text)
    assert not _gone(pid, 0.2)
    if ending == "exit":
        launcher.stdin.close()
    else:
        launcher.send_signal(
            {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[ending]
        )
    launcher.wait(15)
    assert _gone(pid), f"redis-server {pid} outlived its launcher ({ending})"
    if ending != "sigkill":  # SIGKILL leaves no chance to delete files; the server still dies
        assert not Path(folder).exists()


def test_auth_refuses_a_wrong_or_missing_password(redis_server, tmp_path, monkeypatch):
    assert connect(redis_server.url, redis_server.password).ping()
    with pytest.raises(redis.AuthenticationError):
        connect(redis_server.url, "wrong-password").ping()
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)
    with pytest.raises(redis.AuthenticationError):
        connect(redis_server.url).ping()
    # A replica with the wrong password exits at once with a one-line error.
    replica = Replica(redis_server, tmp_path, password="wrong-password", wait=False)
    assert replica.process.wait(60) == 2
    time.sleep(0.2)
    assert "error: --redis-url unix://" in replica.output()
    assert "invalid username-password" in replica.output()


def test_tcp_mode_binds_loopback_only():
    with EmbeddedRedis(tcp=True) as server:
        assert server.url.startswith("redis://127.0.0.1:")
        client = connect(server.url, server.password)
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        client.close()


def test_a_server_started_from_a_thread_outlives_that_thread():
    """Linux sends the parent-death signal when the *thread* that forked exits: a server started or
    restarted from a short-lived thread (bench/chaos.py's fault injector) died with that thread,
    and the chaos run then failed on a Redis that refused every connection."""
    server = EmbeddedRedis()
    try:
        for step in (server.start, server.restart):
            thread = threading.Thread(target=step)
            thread.start()
            thread.join(30)
            time.sleep(0.3)  # the signal, if any, is delivered as the thread exits
            assert server.running, f"redis-server died with the thread that ran {step.__name__}"
            client = connect(server.url, server.password)
            assert client.ping()
            client.close()
    finally:
        server.stop()


def test_embedded_redis_binds_the_given_host_only_with_a_password():
    with pytest.raises(UserError, match="binding 0.0.0.0 needs a password"):
        EmbeddedRedis(password="", tcp=True, host="0.0.0.0")
    server = EmbeddedRedis(tcp=True, host="0.0.0.0").start()  # every interface; clients use loopback here
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = connect(server.url, server.password)
        assert client.ping() and client.config_get("bind")["bind"] == "0.0.0.0"
        client.close()
    finally:
        server.stop()
