"""The child processes `spie cluster up` runs: a labelled replica process that dies with its parent and
stops in two stages, the embedded Redis standing in for a `redis` service, and argv helpers."""

from __future__ import annotations

import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from trainer.errors import UserError

LOCAL = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return s.getsockname()[1]


def get_flag(argv: list[str], flag: str, default: str | None = None) -> str | None:
    """Value of `--flag value` or `--flag=value` in argv, else `default`."""
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default


def set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag` set to `value` (replaced where present, else appended as --flag=value)."""
    out, i, found = [], 0, False
    while i < len(argv):
        arg = argv[i]
        if arg == flag and i + 1 < len(argv):
            out += [flag, value]
            i, found = i + 2, True
            continue
        if arg.startswith(flag + "="):
            out.append(f"{flag}={value}")
            found = True
        else:
            out.append(arg)
        i += 1
    return out if found else [*out, f"{flag}={value}"]


def executable(argv: list[str]) -> list[str]:
    """The local program for argv[0]: `spie`, `spie-reward` and `python` run with this interpreter,
    `ray` from its environment, anything else from PATH."""
    head, rest = argv[0], argv[1:]
    if head == "spie":
        return [sys.executable, "-m", "trainer.cli", *rest]
    if head == "spie-reward":
        return [sys.executable, "-m", "reward_servers", *rest]
    if head in ("python", "python3"):
        return [sys.executable, *rest]
    if head == "ray" and Path(sys.executable).with_name("ray").exists():
        return [str(Path(sys.executable).with_name("ray")), *rest]
    return argv


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stop(Exception):
    """A signal asked the launcher to stop everything."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Process:
    """One replica's child process, in its own session, its output prefixed with its label."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str], cwd: Path, out) -> None:
        self.label = label
        self.tail: deque[str] = deque(maxlen=20)
        self.popen = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,  # its own process group: stopped as one, spared the terminal's Ctrl-C
            preexec_fn=_die_with_parent,
        )
        self.pid = self.popen.pid
        self.thread = threading.Thread(target=self._pump, args=(out,), daemon=True)
        self.thread.start()

    def _pump(self, out) -> None:
        for line in self.popen.stdout:
            line = line.rstrip()
            self.tail.append(line)
            out(f"{self.label} | {line}")

    @property
    def returncode(self) -> int | None:
        return self.popen.poll()

    def last_line(self) -> str:
        return next((x for x in reversed(self.tail) if x.strip()), "no output")

    def stop(self, grace_s: float) -> None:
        """SIGTERM to the process, SIGKILL to its group after `grace_s` (and to any leftovers)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                print(f"[cluster] {self.label}: still running after {grace_s:.0f}s; killing it")
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self.thread.join(timeout=2)


class RedisProcess:
    """The embedded redis-server standing in for a `redis` service."""

    def __init__(self, label: str, password: str, port: int) -> None:
        from reward_servers.queue.embedded import EmbeddedRedis

        self.label = label
        self.server = EmbeddedRedis(password=password, tcp=True, port=port).start()
        self.pid = self.server.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.server.running else 1

    def last_line(self) -> str:
        return "embedded redis-server exited"

    def stop(self, grace_s: float) -> None:
        self.server.stop()


def wait_http(url: str, timeout_s: float) -> bool:
    """True once `url` answers HTTP at all (an error status counts: the server is up), False at the
    deadline."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=3).close()
            return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.5)
    return False


def write_job_env(directory: Path, name: str, address: str, env: dict[str, str], timeout_s: float) -> Path:
    """Wait for a Ray head's job API at `address` to answer, then write what `ray job submit` needs,
    `RAY_API_SERVER_ADDRESS` and, with token authentication, `RAY_AUTH_MODE` and `RAY_AUTH_TOKEN`, to
    `<directory>/.spie/<name>.env` (mode 0600, for `source`); `UserError` at the deadline."""
    values = {"RAY_API_SERVER_ADDRESS": address}
    if env.get("RAY_AUTH_MODE") == "token" and env.get("RAY_AUTH_TOKEN"):
        values.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=env["RAY_AUTH_TOKEN"])
    if not wait_http(address + "/api/version", timeout_s):
        raise UserError(f"{name}: its job API did not answer at {address} within {timeout_s:.0f}s")
    path = directory / ".spie" / f"{name}.env"
    path.parent.mkdir(exist_ok=True)
    path.touch(mode=0o600)
    path.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in values.items()))
    return path
