"""Multi-node: a 2-worker-node `ray.cluster_utils.Cluster`, a custom resource standing in for GPUs,
rollout workers gang-scheduled one per node with a STRICT_SPREAD placement group."""

from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from trainer.loop import train
from trainer.run.log import read_metrics


@pytest.fixture
def two_node_cluster():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"rollout_slot": 1})
    cluster.wait_for_nodes(timeout=120)
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_rollout_workers_spread_over_two_nodes(two_node_cluster, tiny_config, capsys):
    slot_nodes = {n["NodeID"] for n in ray.nodes() if n["Resources"].get("rollout_slot")}
    assert len(slot_nodes) == 2
    config = tiny_config(
        "run.num_epochs=1",
        "run.image_log_freq=0",
        "run.name=cluster",
        "sample.num_batches_per_epoch=2",
        "ray.enabled=true",
        "ray.num_rollout_workers=2",
        "ray.worker_resources={rollout_slot: 1}",
        "ray.placement_strategy=STRICT_SPREAD",
        "ray.start_timeout_s=180",
        previous=True,
    )
    from trainer.engine.ray.engine import RayEngine

    engine = RayEngine(config)
    try:
        placed = {p["node_id"] for p in engine.pool.placement}
    finally:
        engine.close()
    assert placed == slot_nodes  # one worker on each node that has the resource

    metrics = read_metrics(train(config))
    assert "ray: 2 rollout worker(s) on 2 node(s), 1 learner" in capsys.readouterr().out
    assert metrics[-1]["items"] == 16 and metrics[-1]["items_dropped"] == 0
    assert metrics[-1]["rollout_workers"] == 2
