"""Redis restarts during gathering; a replica added mid-stream raises throughput; the trainer-facing
`score(rollout)` interface matches `InProcessRewards`."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from queue_helpers import brightness_items

from reward_servers.queue import protocol as P
from sampler.rollout import Rollout
from trainer.rewards.queue import QueueClientConfig, RewardClient
from trainer.rewards.scores import Scores

FAST_CLAIMS = {"claim_min_idle_ms": 1000, "heartbeat_ms": 250, "claim_interval_ms": 250, "block_ms": 200}


def _run_in_thread(client, items):
    box: dict = {}

    def run():
        try:
            box["scores"] = client.score_items(items)
        except Exception as err:  # reported by the test
            box["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def _wait_done(rdb, n: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if int(rdb.get(P.done_key("sleep")) or 0) >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"fewer than {n} results after {timeout_s}s")


@pytest.mark.parametrize("path", ["inline", "blob"])
def test_redis_restart_during_gathering_completes_within_the_deadline(
    redis_server, rdb, replicas, tmp_path, path
):
    # On the blob path the restart loses the references; the client stores them again (the batch
    # file is still there) with its resubmission.
    blobs = str(tmp_path / "blobs") if path == "blob" else ""
    queue_cfg = {**FAST_CLAIMS, "blob_dir": blobs}
    replica = replicas(scorer_kwargs={"batch_seconds": 0.3, "max_batch_size": 4}, queue_cfg=queue_cfg)
    items, expected = brightness_items(24)
    deadline_s = 20.0
    config = QueueClientConfig(
        url=redis_server.url, deadline_s=deadline_s, resubmits=0, poll_s=0.1, blob_dir=blobs
    )
    client = RewardClient(["sleep"], config, password=redis_server.password)
    start = time.monotonic()
    thread, box = _run_in_thread(client, items)
    _wait_done(rdb, 4, 15)
    redis_server.restart()  # SIGKILL: streams, groups, blobs and results are gone
    thread.join(deadline_s + 10)
    elapsed = time.monotonic() - start
    client.close()
    assert not thread.is_alive(), "score_items hung after the Redis restart"
    assert elapsed < deadline_s
    assert "error" not in box, f"failed: {box.get('error')}"
    scores = box["scores"]
    assert scores.errors["sleep"] == [None] * 24
    np.testing.assert_allclose(scores.values["sleep"], expected)
    assert client.stats.resubmitted > 0 and client.stats.redis_errors > 0
    # The consumer made its group again: after NOGROUP ("recreating it"), or on reconnecting when a
    # connection error came first ("recreated it"), whichever it met.
    replica.wait_for("consumer group gone", 5)


def test_adding_a_replica_mid_stream_raises_throughput(redis_server, rdb, replicas):
    kwargs = {"scorer_kwargs": {"batch_seconds": 0.25, "max_batch_size": 4}, "queue_cfg": FAST_CLAIMS}
    replicas(**kwargs)
    items, expected = brightness_items(96)
    config = QueueClientConfig(url=redis_server.url, deadline_s=60, resubmits=0, poll_s=0.1)
    client = RewardClient(["sleep"], config, password=redis_server.password)
    thread, box = _run_in_thread(client, items)
    _wait_done(rdb, 4, 15)
    t0, d0 = time.monotonic(), int(rdb.get(P.done_key("sleep")))
    replicas(**kwargs)  # returns once the new replica consumes
    t1, d1 = time.monotonic(), int(rdb.get(P.done_key("sleep")))
    time.sleep(0.3)
    t2, d2 = time.monotonic(), int(rdb.get(P.done_key("sleep")))
    _wait_done(rdb, min(d2 + 24, 88), 30)
    t3, d3 = time.monotonic(), int(rdb.get(P.done_key("sleep")))
    thread.join(30)
    client.close()
    assert "scores" in box, box
    np.testing.assert_allclose(box["scores"].values["sleep"], expected)
    alone, together = (d1 - d0) / (t1 - t0), (d3 - d2) / (t3 - t2)
    assert together > 1.5 * alone, f"one replica {alone:.1f} items/s, two {together:.1f} items/s"


def _rollout(levels: list[int]) -> Rollout:
    n = len(levels)
    images = torch.tensor(levels, dtype=torch.float32).div(255).view(n, 1, 1, 1).expand(n, 3, 8, 8).clone()
    return Rollout(
        latents=torch.zeros(n, 2, 4, 1, 1),
        step_index=torch.zeros(n, 1, dtype=torch.long),
        log_probs=torch.zeros(n, 1),
        stochastic=torch.ones(1, dtype=torch.bool),
        text_embeds=torch.zeros(n, 1, 4),
        image_latents=torch.zeros(n, 4, 1, 1),
        images=images,
        sources=images.clone(),
        group=torch.arange(n),
        instructions=["brighter"] * n,
        item_ids=[f"e0-b0-i{i}" for i in range(n)],
    )


def test_score_rollout_matches_the_in_process_interface(redis_server, replicas):
    replicas(scorer_kwargs={"batch_seconds": 0.01})
    levels = [0, 51, 102, 255]
    config = QueueClientConfig(url=redis_server.url, deadline_s=20, poll_s=0.1)
    with RewardClient(["sleep"], config, password=redis_server.password) as client:
        scores = client.score(_rollout(levels))
    assert isinstance(scores, Scores)
    np.testing.assert_allclose(scores.values["sleep"], np.array(levels) / 255)
    assert scores.failed() == []


def test_a_submission_cut_off_midway_is_sent_again(redis_server, rdb, replicas):
    """A submission whose pipeline fails (Redis restarted or frozen while it was sent) is sent again
    at once, not left to the deadline: the chaos run (bench/chaos.py) lost 30 s per such epoch and
    failed when it happened twice to one batch. Redis holds every write for 1.5 s (CLIENT PAUSE
    WRITE) while reads go on, so the client's submission is its first call to fail."""
    replicas(scorer_kwargs={"batch_seconds": 0.0, "max_batch_size": 8}, queue_cfg=FAST_CLAIMS)
    items, expected = brightness_items(8)
    deadline_s = 10.0
    config = QueueClientConfig(
        url=redis_server.url, deadline_s=deadline_s, resubmits=0, poll_s=0.1, call_timeout_s=0.5
    )
    client = RewardClient(["sleep"], config, password=redis_server.password)
    keys = P.BatchKeys(client.run_id, f"{client.attempt_id}-b1")
    rdb.set(keys.live, "1", ex=60)  # the batch marker exists: the next write is the submission itself
    rdb.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
    start = time.monotonic()
    scores = client.score_items(items)
    elapsed = time.monotonic() - start
    client.close()
    assert scores.errors["sleep"] == [None] * 8
    np.testing.assert_allclose(scores.values["sleep"], expected)
    assert client.stats.redis_errors >= 1  # the cut-off submission
    assert client.stats.resubmitted == 0 and elapsed < deadline_s / 2, elapsed
