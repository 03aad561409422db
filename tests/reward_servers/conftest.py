"""Fixtures for reward-server tests: a real grpc.aio server on loopback, run on its own event loop
thread, and a gated scorer that lets a test hold a batch inside the scorer."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from reward_servers.base import ScoreBatch, ScoreResult, build_scorer
from reward_servers.batcher import BatcherConfig
from reward_servers.client import ScorerClient
from reward_servers.config import ServerConfig
from reward_servers.server import RewardServer


class ServerThread:
    """A `RewardServer` on 127.0.0.1 (free port) with its event loop on a background thread."""

    def __init__(self, factory, name: str, config: ServerConfig, batching: BatcherConfig, load: bool):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = RewardServer(factory, name, config, batching)
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"
        if load:
            self.call(self.server.load())

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, **kwargs) -> ScorerClient:
        return ScorerClient(self.target, timeout_s=kwargs.pop("timeout_s", 30.0), **kwargs)

    def close(self) -> None:
        self.call(self.server.stop(grace_s=5.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def serve():
    """`serve(scorer_or_factory, name=..., load=True, **server_fields, batching=BatcherConfig(...))`."""
    started: list[ServerThread] = []

    def start(scorer="ssim_structure", name=None, load=True, batching=None, **server_fields):
        if isinstance(scorer, str):
            name = name or scorer
            factory = lambda: build_scorer(scorer)  # noqa: E731
        else:
            factory = scorer
            name = name or "custom"
        config = ServerConfig(host="127.0.0.1", port=0, **server_fields)
        st = ServerThread(factory, name, config, batching or BatcherConfig(max_queue_delay_ms=2.0), load)
        started.append(st)
        return st

    yield start
    for st in started:
        st.close()


class GatedScorer:
    """Wraps a real scorer; every `score` call first waits for `gate` (up to 30 s) and records the
    batch size, so a test can hold the worker busy and fill the queue behind it."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name, self.version, self.model_id = inner.name, inner.version, inner.model_id
        self.higher_is_better, self.max_batch_size = inner.higher_is_better, inner.max_batch_size
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.sizes: list[int] = []

    def score(self, batch: ScoreBatch) -> ScoreResult:
        self.entered.set()
        if not self.gate.wait(30):
            raise TimeoutError("gate never opened")
        self.sizes.append(len(batch))
        return self.inner.score(batch)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def random_image(rng, h: int = 32, w: int = 32) -> np.ndarray:
    """(h, w, 3) uint8 noise."""
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.fixture
def image(rng):
    return lambda h=32, w=32: random_image(rng, h, w)
