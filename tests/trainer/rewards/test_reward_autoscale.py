"""Each scorer scales its Ray replica actors: bursty load on the latency-bound `sleep` scorer raises
the replicas from min and lets them fall back to min (drained: nothing lost, doubled or
dead-lettered), and a replica actor killed mid-batch is restarted by Ray with nothing lost."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import ray
from queue_helpers import brightness_items, redis_client
from ray_reward_helpers import Watch, check_nothing_lost, scored_again, sleep_reward, wait_until

from reward_servers.queue import protocol as P
from reward_servers.queue.embedded import EmbeddedRedis
from reward_servers.queue.stats import collect
from trainer.config.reward_scaling import ScorerReplicas
from trainer.rewards.autoscaler import ScorerState, wanted
from trainer.rewards.queue import QueueClientConfig, RewardClient
from trainer.rewards.ray_replicas import RayReplicaSet


def test_wanted_replicas_follow_backlog_rate_and_bounds():
    spec = ScorerReplicas(scorer="s", min_replicas=1, max_replicas=4, target_drain_s=2.0)
    assert wanted(spec, 0, 10.0, 3) == 1  # idle: min
    assert wanted(spec, 30, 10.0, 1) == 2  # 30 jobs at 10/s each within 2 s
    assert wanted(spec, 1000, 10.0, 1) == 4  # capped at max
    assert wanted(spec, 5, None, 1) == 2  # nothing measured yet: one more while there is work
    state = ScorerState(rate=10.0)
    spec = ScorerReplicas(scorer="s", max_replicas=4, scale_up_cooldown_s=1.0, scale_down_cooldown_s=5.0)
    assert state.decide(spec, 1000, 1, now=100.0) == 4
    state.last_event = 100.0
    assert state.decide(spec, 0, 4, now=100.5) == 4  # down only after the want stayed low 5 s
    assert state.decide(spec, 0, 4, now=104.0) == 4
    assert state.decide(spec, 0, 4, now=105.6) == 1
    state.measure({"a": {"completed": 0, "busy_s": 0.0}})
    state.measure({"a": {"completed": 40, "busy_s": 2.0}})
    assert state.rate == pytest.approx(15.0)  # 10 and a 20/s sample, smoothed
    # Batches finish in steps: 8 jobs every 0.8 s, looked at every 0.25 s. Looks that saw nothing
    # finish carry their busy time into the next sample: 10 jobs/s, not 8 / 0.25 = 32.
    state = ScorerState()
    for k in range(13):
        t = 0.25 * k
        state.measure({"a": {"completed": 8 * int(t / 0.8), "busy_s": t}})
    assert state.rate == pytest.approx(10.0, rel=0.1)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def tcp_redis():
    server = EmbeddedRedis(tcp=True).start()
    yield server
    server.stop()


def _client(server, deadline_s: float = 60.0) -> RewardClient:
    config = QueueClientConfig(url=server.url, deadline_s=deadline_s, resubmits=0, poll_s=0.1)
    return RewardClient(["sleep"], config, password=server.password)


def test_bursts_scale_replicas_up_and_back_down_losing_nothing(local_ray, tcp_redis):
    # 0.4 s per batch of 4: 10 items/s per replica; 40 waiting items want 3 to drain within 1 s.
    reward = sleep_reward(
        0.4,
        4,
        min_replicas=1,
        max_replicas=3,
        target_drain_s=1.0,
        scale_up_cooldown_s=0.5,
        scale_down_cooldown_s=1.5,
    )
    rdb = redis_client(tcp_redis)
    replicas = RayReplicaSet(reward, tcp_redis.url, tcp_redis.password)
    watch = Watch(rdb)
    clients = [_client(tcp_redis), _client(tcp_redis)]
    group = replicas.groups[0]
    try:
        assert group.count == 1
        total, events, peak = 0, [], []

        def settled() -> bool:
            metrics = replicas.metrics()  # hands each event over once
            events.extend(metrics["reward/scaling_events"])
            peak.append(metrics["reward/sleep/replicas_max"])
            return metrics["reward/sleep/replicas"] == 1 and metrics["reward/sleep/draining"] == 0

        for burst in range(2):
            # Two clients keep 40-80 jobs waiting until a second replica consumes and scored: a Ray
            # actor can take longer to start on a loaded machine than one batch of jobs lasts.
            start, stop, chunks = len(watch.counts), threading.Event(), []

            def feed(client, seed, stop=stop, chunks=chunks):
                while not stop.is_set() and len(chunks) < 40:
                    items, expected = brightness_items(40, seed=seed + len(chunks))
                    chunks.append((client.score_items(items), expected))

            feeders = [
                threading.Thread(target=feed, args=(c, 1000 * burst + 100 * k)) for k, c in enumerate(clients)
            ]
            for f in feeders:
                f.start()
            wait_until(
                lambda start=start: max(watch.counts[start:], default=0) >= 2,
                120,
                "a second replica consuming",
            )
            time.sleep(1.0)  # it takes jobs
            stop.set()
            for f in feeders:
                f.join(60)
            for scores, expected in chunks:
                np.testing.assert_allclose(scores.values["sleep"], expected, atol=1e-9)
            total += 40 * len(chunks)
            counts = {k: sum(c.take_counts().get(k, 0) for c in clients) for k in ("queue.resubmitted",)}
            check_nothing_lost(scores, expected, counts, rdb, total)
            # The learner's turn: the scorer idles and drains back to its minimum.
            wait_until(settled, 60, "back to 1 replica", describe=lambda: f"events {events}")
        assert max(peak) >= 2
        ups = [e for e in events if e["action"] == "up"]
        drained = [e for e in events if e["action"] == "drained"]
        assert ups and drained and all(e["clean"] for e in drained)
        assert sum(e["scored_again"] or 0 for e in drained) == 0
        assert max(watch.counts) >= 2
        # Drained replicas left the group and the presence hash: only the one kept remains, and
        # `spie queue stats` shows it and the last scaling event.
        wait_until(lambda: len(rdb.xinfo_consumers(P.jobs_key("sleep"), P.GROUP)) == 1, 10, "one consumer")
        row = collect(rdb, 0)[0]
        assert row.replicas == 1 and row.draining == 0 and row.last_scaling["action"] in ("down", "drained")
    finally:
        watch.stop()
        for c in clients:
            c.close()
        replicas.close()
    assert sum(watch.scored_again.values()) == 0


def test_replica_actor_killed_mid_batch_is_restarted_and_loses_nothing(local_ray, tcp_redis):
    reward = sleep_reward(1.0, 4, min_replicas=2, max_replicas=2)
    rdb = redis_client(tcp_redis)
    replicas = RayReplicaSet(reward, tcp_redis.url, tcp_redis.password)
    group = replicas.groups[0]
    client = _client(tcp_redis)
    try:
        victim = group.members[0]
        before = victim.where["name"]
        items, expected = brightness_items(24)
        box = {}
        worker = threading.Thread(target=lambda: box.update(scores=client.score_items(items)))
        worker.start()

        def victim_holds() -> bool:
            consumers = rdb.xpending(P.jobs_key("sleep"), P.GROUP)["consumers"]
            return any(c["name"].decode() == before and c["pending"] for c in consumers)

        wait_until(victim_holds, 20, "the victim holds jobs", step_s=0.02)
        time.sleep(0.3)  # inside its 1 s batch
        ray.kill(victim.handle, no_restart=False)
        worker.join(60)
        assert not worker.is_alive()
        check_nothing_lost(box["scores"], expected, client.take_counts(), rdb, len(items))
        # Ray restarted the actor: a new consumer registered in its place, two replicas serve.
        after = ray.get(victim.handle.wait_ready.remote(30), timeout=60)
        assert after["name"] != before
        live = wait_until(
            lambda: len(rdb.hgetall(P.replicas_key("sleep"))) >= 2 and rdb.hgetall(P.replicas_key("sleep")),
            15,
            "2 live",
        )
        assert after["name"].encode() in live
        assert scored_again(group) == 0
        seen = []  # the autoscaler's health check notices the restart (a new consumer name)
        wait_until(
            lambda: (
                seen.extend(replicas.metrics()["reward/scaling_events"])
                or any(e["action"] == "restarted" for e in seen)
            ),
            15,
            "a restarted event",
        )
    finally:
        client.close()
        replicas.close()


def test_replica_out_of_restarts_is_replaced_by_the_autoscaler(local_ray, tcp_redis):
    reward = sleep_reward(0.1, 4, min_replicas=1, max_replicas=1, max_restarts=0)
    replicas = RayReplicaSet(reward, tcp_redis.url, tcp_redis.password)
    group = replicas.groups[0]
    client = _client(tcp_redis)
    try:
        first = group.members[0]
        ray.kill(first.handle, no_restart=True)  # as a replica whose restarts are used up
        wait_until(
            lambda: group.members and group.members[0] is not first and group.members[0].where,
            40,
            "a new one",
        )
        events = [e["action"] for e in replicas.metrics()["reward/scaling_events"]]
        assert "died" in events and "up" in events
        items, expected = brightness_items(8)
        check_nothing_lost(
            client.score_items(items), expected, client.take_counts(), redis_client(tcp_redis), 8
        )
    finally:
        client.close()
        replicas.close()


def test_replicas_that_cannot_load_or_be_placed_fail_in_one_line(local_ray, tcp_redis):
    import dataclasses

    from trainer.config.schema import ScorerConfig
    from trainer.errors import UserError

    bad = dataclasses.replace(sleep_reward(0.1, 4), scorers=(ScorerConfig(name="sleep", kwargs={"nope": 1}),))
    with pytest.raises(UserError, match=r"reward replica of sleep failed: .*no option\(s\) \['nope'\]"):
        RayReplicaSet(bad, tcp_redis.url, tcp_redis.password)
    nowhere = dataclasses.replace(
        sleep_reward(0.1, 4, resources={"reward_slot": 1}), server_start_timeout_s=2.0
    )
    start = time.monotonic()
    with pytest.raises(UserError, match=r"1 not placed or not consuming within 2s .*'reward_slot': 1"):
        RayReplicaSet(nowhere, tcp_redis.url, tcp_redis.password)
    assert time.monotonic() - start < 15  # the pending actor is killed, not drained
