"""Helpers for queue tests (a uniquely named module): real `spie serve` replica processes consuming
from a real embedded Redis, and items whose expected score is known."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from reward_servers.images import make_item
from reward_servers.queue import protocol as P

REPO = Path(__file__).resolve().parents[1]


class Replica:
    """One `spie serve <scorer> --port 0` process with its stream consumer; output kept in `lines`."""

    def __init__(
        self,
        redis,
        folder: Path,
        scorer: str = "sleep",
        scorer_kwargs=None,
        queue_cfg=None,
        batching=None,
        server=None,
        password: str | None = None,
        extra_args=(),
        wait: bool = True,
    ):
        config = {"scorer": scorer_kwargs or {}, "queue": queue_cfg or {}, "batching": batching or {}}
        if server:
            config["server"] = server
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"replica-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(config))
        env = dict(
            os.environ, REDIS_URL=redis.url, REDIS_PASSWORD=redis.password if password is None else password
        )
        env["PYTHONPATH"] = str(REPO)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "reward_servers",
                "serve",
                scorer,
                "--port",
                "0",
                "--config",
                str(path),
                *extra_args,
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        if wait:
            self.wait_for("consuming", 60)

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip())
            self._new.put(line)

    def wait_for(self, fragment: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        for line in list(self.lines):
            if fragment in line:
                return line
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=min(0.5, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if fragment in line:
                return line
        raise AssertionError(f"replica never printed {fragment!r}; output:\n" + "\n".join(self.lines[-30:]))

    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def brightness_items(n: int, seed: int = 0, size: int = 8, instruction: str = "brighter"):
    """n proto Items with distinct constant-grey edits; returns (items, expected sleep-scorer scores)."""
    rng = np.random.default_rng(seed)
    levels = rng.permutation(256)[:n]
    items, expected = [], []
    for i, level in enumerate(levels):
        edit = np.full((size, size, 3), level, dtype=np.uint8)
        items.append(make_item(f"it{i}", edit, edit, instruction))
        expected.append(level / 255.0)
    return items, np.array(expected)


def redis_client(server):
    return P.connect(server.url, server.password)
