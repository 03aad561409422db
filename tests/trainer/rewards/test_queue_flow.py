"""Failure isolation, deduplication and backpressure through real replicas and a real Redis."""

from __future__ import annotations

import threading
import time
import urllib.request

import numpy as np
from queue_helpers import brightness_items

from reward_servers.images import make_item
from reward_servers.queue import protocol as P
from trainer.rewards.queue import QueueClientConfig, RewardClient


def _client(redis_server, **fields) -> RewardClient:
    fields.setdefault("poll_s", 0.2)
    config = QueueClientConfig(url=redis_server.url, **fields)
    return RewardClient(["sleep"], config, password=redis_server.password)


def test_poison_item_goes_to_dead_letters_and_the_rest_completes(redis_server, rdb, replicas):
    replicas(scorer_kwargs={"batch_seconds": 0.05, "poison": "poison"}, queue_cfg={"max_attempts": 2})
    items, expected = brightness_items(8)
    items[3].instruction = "poison"
    with _client(redis_server, deadline_s=20, resubmits=0) as client:
        scores = client.score_items(items)
    errors = scores.errors["sleep"]
    assert [i for i, e in enumerate(errors) if e is not None] == [3]
    assert "dead-lettered after 2 attempts" in errors[3] and "poison" in errors[3]
    assert np.isnan(scores.values["sleep"][3])
    keep = [i for i in range(8) if i != 3]
    np.testing.assert_allclose(scores.values["sleep"][keep], expected[keep])
    dead = rdb.xrange(P.dead_key("sleep"))
    assert len(dead) == 1
    fields = {k.decode(): v.decode() for k, v in dead[0][1].items()}
    assert fields["index"] == "3" and fields["attempts"] == "2" and "poison" in fields["error"]


def test_undecodable_item_fails_alone_without_retries(redis_server, rdb, replicas):
    replicas(scorer_kwargs={"batch_seconds": 0.05})
    items, expected = brightness_items(4)
    items[1].edited.data = items[1].edited.data[:-5]  # states 8x8x3 but carries fewer bytes
    with _client(redis_server, deadline_s=20, resubmits=0) as client:
        scores = client.score_items(items)
    assert "states 8x8x3" in scores.errors["sleep"][1]
    assert [e is None for e in scores.errors["sleep"]] == [True, False, True, True]
    assert rdb.xlen(P.dead_key("sleep")) == 0  # bad input is final, not a retried failure


def _items_scored(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    line = next(x for x in text.splitlines() if x.startswith("spie_reward_items_scored_total"))
    return float(line.split()[-1])


def test_duplicate_jobs_are_scored_but_written_and_seen_once(redis_server, rdb, replicas, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    replicas(
        scorer_kwargs={"batch_seconds": 0.4, "max_batch_size": 8}, extra_args=("--metrics-port", str(port))
    )
    items, expected = brightness_items(8)
    # Two gatherers submit the same rollout batch under the same batch keys (one run id, one attempt
    # id, as a duplicated submission would): every job exists twice.
    clients = [_client(redis_server, deadline_s=20, resubmits=0, run_id="dup") for _ in range(2)]
    clients[1].attempt_id = clients[0].attempt_id
    barrier, out = threading.Barrier(2), {}

    def run(k):
        barrier.wait()
        out[k] = clients[k].score_items(items)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == 2
    for scores in out.values():
        assert scores.errors["sleep"] == [None] * 8
        np.testing.assert_allclose(scores.values["sleep"], expected)
    deadline = time.monotonic() + 10  # the duplicates' batch may still be running
    while _items_scored(port) <= 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _items_scored(port) > 8  # duplicates were really scored...
    assert int(rdb.get(P.done_key("sleep"))) == 8  # ...but each result was written once
    for c in clients:
        c.close()


def test_backpressure_holds_the_in_flight_cap(redis_server, rdb, replicas):
    replicas(scorer_kwargs={"batch_seconds": 0.15, "max_batch_size": 2})
    items, expected = brightness_items(30)
    cap, seen, stop = 5, [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(rdb.xlen(P.jobs_key("sleep")))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with _client(redis_server, deadline_s=30, resubmits=0, max_in_flight=cap, poll_s=0.05) as client:
            scores = client.score_items(items)
    finally:
        stop.set()
        watcher.join()
    np.testing.assert_allclose(scores.values["sleep"], expected)
    assert max(seen) <= cap
    assert max(seen) == cap  # the cap was reached, so it is what held submission back
    assert client.stats.max_stream_len["sleep"] <= cap


def test_no_replica_fails_with_a_clear_error_within_the_deadline(redis_server):
    item = make_item("lonely", np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.uint8))
    with _client(redis_server, deadline_s=0.6, resubmits=1) as client:
        start = time.monotonic()
        try:
            client.score_items([item])
            raise AssertionError("score_items returned without any replica")
        except RuntimeError as err:
            message = str(err)
        elapsed = time.monotonic() - start
    assert elapsed < 3.0
    assert "scorer 'sleep': 1 of 1 items (lonely)" in message
    assert "0 live replica(s)" in message or "stream unavailable" in message


def test_a_killed_replica_stops_counting_within_seconds(redis_server, replicas):
    """Issue 26 #4: replica counts come from heartbeats (a refresh every second, 5 s to lapse), not
    from the consumer group's idle time (60 s): 7 s after the only replica is SIGKILLed, a deadline's
    error says 0 live replicas."""
    replica = replicas(scorer_kwargs={"batch_seconds": 0.05})
    items, _ = brightness_items(1)
    with _client(redis_server, deadline_s=20, resubmits=0) as client:
        client.score_items(items)  # the replica is up and consuming
    replica.process.kill()
    replica.process.wait(10)
    time.sleep(7.0)
    with _client(redis_server, deadline_s=0.6, resubmits=0) as client:
        try:
            client.score_items(items)
            raise AssertionError("scored without a replica")
        except RuntimeError as err:
            assert "sleep: " in str(err) and "0 live replica(s)" in str(err), str(err)


def test_a_nan_score_fails_its_item_at_once_without_retries(redis_server, rdb, replicas):
    """A NaN or inf score depends on the item alone: one attempt, its own reason, no dead letter."""
    replicas(scorer_kwargs={"batch_seconds": 0.05, "nan": "nan"}, queue_cfg={"max_attempts": 3})
    items, expected = brightness_items(4)
    items[2].instruction = "nan"
    with _client(redis_server, deadline_s=20, resubmits=0) as client:
        scores = client.score_items(items)
    errors = scores.errors["sleep"]
    assert [e is None for e in errors] == [True, True, False, True]
    assert errors[2].startswith("scorer returned nan for this item"), errors[2]
    np.testing.assert_allclose(scores.values["sleep"][[0, 1, 3]], expected[[0, 1, 3]])
    assert rdb.xlen(P.dead_key("sleep")) == 0
