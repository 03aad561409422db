"""Crash safety: a replica killed with SIGKILL mid-batch loses no work, and a batch that runs longer
than the takeover idle time is not stolen from a live replica (heartbeats)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from queue_helpers import brightness_items

from reward_servers.queue import protocol as P
from trainer.rewards.queue import QueueClientConfig, RewardClient

# Batches (1.2 s) outlast the takeover idle time (1 s): only heartbeats keep live jobs in place.
FAST_CLAIMS = {"claim_min_idle_ms": 1000, "heartbeat_ms": 250, "claim_interval_ms": 250, "block_ms": 200}


def _consumer_name(replica) -> str:
    return replica.wait_for("consuming", 5).rsplit(" as ", 1)[1].strip()


def _taken_over(replica) -> int:
    return sum(int(n) for n in re.findall(r"took over (\d+) abandoned", replica.output()))


@pytest.mark.parametrize("path", ["inline", "blob"])
def test_kill_one_of_two_replicas_mid_batch_loses_and_duplicates_nothing(
    redis_server, rdb, replicas, tmp_path, path
):
    # On the blob path (payloads in a shared folder, references in Redis) every guarantee holds too.
    blobs = str(tmp_path / "blobs") if path == "blob" else ""
    queue_cfg = {**FAST_CLAIMS, "blob_dir": blobs}
    kwargs = {"scorer_kwargs": {"batch_seconds": 1.2, "max_batch_size": 4}, "queue_cfg": queue_cfg}
    victim, survivor = replicas(**kwargs), replicas(**kwargs)
    items, expected = brightness_items(16)
    config = QueueClientConfig(url=redis_server.url, deadline_s=30, resubmits=0, poll_s=0.2, blob_dir=blobs)
    client = RewardClient(["sleep"], config, password=redis_server.password)

    import threading

    box = {}
    worker = threading.Thread(target=lambda: box.update(scores=client.score_items(items)))
    start = time.monotonic()
    worker.start()
    stream, name = P.jobs_key("sleep"), _consumer_name(victim)
    held = 0
    while time.monotonic() - start < 20 and not held:
        consumers = rdb.xpending(stream, P.GROUP)["consumers"]
        held = sum(c["pending"] for c in consumers if c["name"].decode() == name)
        time.sleep(0.02)
    assert held, "the victim never took any job"
    time.sleep(0.4)  # inside its first 1.2 s batch
    victim.kill()
    orphaned = sum(
        c["pending"] for c in rdb.xpending(stream, P.GROUP)["consumers"] if c["name"].decode() == name
    )
    worker.join(40)
    assert not worker.is_alive(), "score_items hung"
    scores = box["scores"]
    client.close()

    assert orphaned > 0
    # The trainer sees every item exactly once, with its own score: 0 lost, 0 duplicated.
    assert scores.errors["sleep"] == [None] * 16
    np.testing.assert_allclose(scores.values["sleep"], expected)
    assert int(rdb.get(P.done_key("sleep"))) == 16  # each result key was written once
    assert client.stats.resubmitted == 0  # recovered by takeover, not by the client's resubmission
    # The survivor took over exactly the victim's jobs, never its own in-flight ones.
    assert _taken_over(survivor) == orphaned
    assert rdb.xlen(P.dead_key("sleep")) == 0
    assert rdb.xlen(stream) == 0
    if blobs:  # the batch went through the folder, whose file the client deleted once gathered
        assert (tmp_path / "blobs").is_dir() and list((tmp_path / "blobs").iterdir()) == []


def test_slow_batch_is_not_stolen_from_a_live_replica(redis_server, rdb, replicas):
    kwargs = {
        "scorer_kwargs": {"batch_seconds": 2.5, "max_batch_size": 4},
        "queue_cfg": {**FAST_CLAIMS, "prefetch": 4},
    }
    first, second = replicas(**kwargs), replicas(**kwargs)
    items, expected = brightness_items(8, seed=1)
    config = QueueClientConfig(url=redis_server.url, deadline_s=30, resubmits=0, poll_s=0.2)
    with RewardClient(["sleep"], config, password=redis_server.password) as client:
        scores = client.score_items(items)
    np.testing.assert_allclose(scores.values["sleep"], expected)
    # Each replica scored one 2.5 s batch (> 1 s takeover idle time); neither took over anything.
    assert _taken_over(first) == 0 and _taken_over(second) == 0
    assert int(rdb.get(P.done_key("sleep"))) == 8
