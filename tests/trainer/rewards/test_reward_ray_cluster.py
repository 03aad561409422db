"""`reward.launch: ray` on a multi-node `ray.cluster_utils.Cluster`: a head with no GPUs and a reward
node declaring 2 GPUs and 2 `reward_slot`s. Replica actors land on the reward node, the tiny training
config scores through them, and a replica killed mid-run (its process, SIGKILL) is restarted by
Ray with nothing lost, also during a training run."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import ray
from queue_helpers import brightness_items, redis_client
from ray.cluster_utils import Cluster
from ray_reward_helpers import FAST_CLAIMS, check_nothing_lost, scored_again, sleep_reward, wait_until

from reward_servers.queue import protocol as P
from reward_servers.queue.embedded import EmbeddedRedis
from reward_servers.queue.presence import live_replicas
from trainer.loop import train
from trainer.rewards.queue import QueueClientConfig, RewardClient
from trainer.rewards.ray_replicas import RayReplicaSet
from trainer.run.log import read_metrics

ON_REWARD_NODE = {"num_cpus": 1, "num_gpus": 1, "resources": {"reward_slot": 1}}


@pytest.fixture(scope="module")
def reward_cluster():
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False}
    )
    node = cluster.add_node(num_cpus=2, num_gpus=2, resources={"reward_slot": 2})
    cluster.wait_for_nodes(timeout=120)
    ray.init(address=cluster.address, log_to_driver=False)
    yield node.node_id
    ray.shutdown()
    cluster.shutdown()


def test_replicas_land_on_the_reward_node_and_a_killed_one_is_restarted(reward_cluster):
    redis = EmbeddedRedis(tcp=True).start()  # loopback: every node of cluster_utils is this machine
    rdb = redis_client(redis)
    reward = sleep_reward(1.0, 4, min_replicas=2, max_replicas=2, **ON_REWARD_NODE)
    replicas = RayReplicaSet(reward, redis.url, redis.password)
    config = QueueClientConfig(url=redis.url, deadline_s=60, resubmits=0, poll_s=0.1)
    client = RewardClient(["sleep"], config, password=redis.password)
    try:
        group = replicas.groups[0]
        assert {m.where["node_id"] for m in group.members} == {reward_cluster}
        victim = group.members[1].where
        items, expected = brightness_items(24)
        box = {}
        worker = threading.Thread(target=lambda: box.update(scores=client.score_items(items)))
        worker.start()

        def victim_holds() -> bool:
            consumers = rdb.xpending(P.jobs_key("sleep"), P.GROUP)["consumers"]
            return any(c["name"].decode() == victim["name"] and c["pending"] for c in consumers)

        wait_until(victim_holds, 20, "the victim holds jobs", step_s=0.02)
        time.sleep(0.3)
        os.kill(victim["pid"], signal.SIGKILL)  # the replica's process dies mid-batch
        worker.join(60)
        assert not worker.is_alive()
        check_nothing_lost(box["scores"], expected, client.take_counts(), rdb, len(items))
        again = ray.get(group.members[1].handle.wait_ready.remote(30), timeout=60)
        assert again["pid"] != victim["pid"] and again["node_id"] == reward_cluster
        assert scored_again(group) == 0
    finally:
        client.close()
        replicas.close()
        rdb.close()
        redis.stop()


def test_tiny_training_scores_through_ray_replicas_one_killed_mid_run(
    reward_cluster, tiny_config, monkeypatch, capsys
):
    redis = EmbeddedRedis(tcp=True).start()
    monkeypatch.setenv("REDIS_PASSWORD", redis.password)
    rdb = redis_client(redis)
    config = tiny_config(
        "run.num_epochs=3",
        "run.image_log_freq=0",
        "run.name=ray-replicas",
        "reward.transport=queue",
        "reward.launch=ray",
        f"reward.redis_url={redis.url}",
        "reward.ray.scorers=[{scorer: brightness, num_cpus: 1, num_gpus: 1, resources: {reward_slot: 1},"
        " min_replicas: 2, max_replicas: 2}]",
        "reward.ray.interval_s=0.2",
        f"reward.ray.queue={FAST_CLAIMS}",
    )
    killed = {}

    def kill_one_after_the_first_batch() -> None:  # the run goes on; Ray restarts the replica
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if int(rdb.get(P.done_key("brightness")) or 0) > 0:
                entry = next(iter(live_replicas(rdb, "brightness").values()))
                os.kill(entry["pid"], signal.SIGKILL)
                killed.update(entry)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_one_after_the_first_batch, daemon=True)
    killer.start()
    try:
        metrics = read_metrics(train(config))
    finally:
        killer.join(5)
        rdb.close()
        redis.stop()
    out = capsys.readouterr().out
    assert "2 brightness replica actor(s) consuming on 1 node(s)" in out
    assert killed, "no replica was killed"
    assert [r["epoch"] for r in metrics] == [0, 1, 2]
    for record in metrics:
        assert record["items"] == 64 and record["items_dropped"] == 0 and record["queue.resubmitted"] == 0
        assert record["reward/brightness/replicas"] == 2
        assert isinstance(record["reward/scaling_events"], list)


def test_the_run_starts_redis_on_tcp_for_its_replica_actors(reward_cluster, tiny_config, capsys):
    config = tiny_config(
        "run.num_epochs=1",
        "run.image_log_freq=0",
        "run.name=ray-own-redis",
        "reward.transport=queue",
        "reward.launch=ray",
        "reward.ray.scorers=[{scorer: brightness, num_cpus: 1, resources: {reward_slot: 1}}]",
    )
    metrics = read_metrics(train(config))
    out = capsys.readouterr().out
    assert "started an embedded Redis at redis://127.0.0.1:" in out  # TCP, reward.redis_host
    assert "warning: Redis on loopback" in out  # two Ray nodes: on a real cluster, set redis_host
    assert metrics[0]["items_dropped"] == 0 and metrics[0]["reward/brightness/replicas"] == 1
