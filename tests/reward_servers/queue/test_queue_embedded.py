"""The embedded redis-server: AUTH, and removal on every way its launcher can end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis
from queue_helpers import REPO, Replica
from reward_helpers import ServerThread, random_image

from reward_servers.base import build_scorer
from reward_servers.batcher import BatcherConfig
from reward_servers.config import ServerConfig
from reward_servers.errors import UserError
from reward_servers.images import make_item
from reward_servers.queue.embedded import EmbeddedRedis
from reward_servers.queue.protocol import connect

LAUNCHER = """
import signal
import sys
import tempfile
from reward_servers.base import build_scorer
from reward_servers.batcher import BatcherConfig
from reward_servers.config import ServerConfig
from reward_servers.errors import UserError
from reward_servers.images import make_item
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
    shutil.rmtree(folder, ignore_errors=True)  # what SIGKILL left behind (issue 26 #11)


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


def test_a_start_that_fails_removes_its_folder(tmp_path, monkeypatch):
    """Issue 26 #11: a redis-server that exits at start (here: its port is taken) left its
    spie-redis-* folder (config, log) in the temp folder."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with EmbeddedRedis(tcp=True) as taken:
        with pytest.raises(UserError, match="exited with"):
            EmbeddedRedis(tcp=True, port=taken.port).start()
        assert [p.name for p in tmp_path.glob("spie-redis-*")] == [taken.folder.name]
    assert list(tmp_path.glob("spie-redis-*")) == []


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


_FORKS_SEEN: list[int] = []
os.register_at_fork(before=lambda: _FORKS_SEEN.append(1))  # runs only when a fork runs Python handlers


def test_twenty_starts_after_grpc_use_inherit_nothing_of_grpc(tmp_path, monkeypatch):
    """Issue 26 #8: a launcher holding gRPC channels whose server stopped aborted the child (-6) in
    gRPC's fork handlers about 1 start in 60 (a `preexec_fn` made CPython fork and run them). The
    server is now spawned with no fork handler at all: Python's `before` handlers never run, and
    every start answers while the stale channels keep retrying on other threads."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    st = ServerThread(
        lambda: build_scorer("brightness"), "brightness", ServerConfig(port=0), BatcherConfig(), True
    )
    clients = [st.client(timeout_s=1.0) for _ in range(3)]
    image = random_image(np.random.default_rng(0), 8, 8)
    for client in clients:
        client.score([make_item("a", image, image)])
    st.close()  # the channels now point at a stopped server

    def retry_stale_channels():
        for client in clients:
            with contextlib.suppress(grpc.RpcError):
                client.score([make_item("a", image, image)])

    _FORKS_SEEN.clear()
    try:
        for _ in range(20):
            busy = threading.Thread(target=retry_stale_channels)
            busy.start()
            with EmbeddedRedis() as server, contextlib.closing(connect(server.url, server.password)) as rdb:
                assert rdb.ping()
            busy.join(30)
    finally:
        for client in clients:
            client.close()
    assert _FORKS_SEEN == [], "starting redis-server ran the launcher's fork handlers"
    assert list(tmp_path.glob("spie-redis-*")) == []  # stop() removed every folder
