"""Fixtures for reward-server tests; the helpers they use live in reward_helpers.py."""

from __future__ import annotations

import numpy as np
import pytest
from reward_helpers import ServerThread, random_image

from reward_servers.base import build_scorer
from reward_servers.batcher import BatcherConfig
from reward_servers.config import ServerConfig


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


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def image(rng):
    """`image(h=32, w=32)`: (h, w, 3) uint8 noise from the test's seeded generator."""
    return lambda h=32, w=32: random_image(rng, h, w)


@pytest.fixture(scope="module")
def vlm_folders(tmp_path_factory):
    """{family: folder} of the tiny seeded Qwen2-VL and Qwen3-VL judges, saved once per module."""
    from reward_servers.vlm_judge import save_tiny

    return {f: save_tiny(str(tmp_path_factory.mktemp(f)), family=f) for f in ("qwen2_vl", "qwen3_vl")}
