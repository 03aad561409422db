"""`spie queue stats` against a live replica."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from queue_helpers import REPO, brightness_items

from reward_servers.queue import protocol as P
from trainer.rewards.queue import QueueClientConfig, RewardClient


def _stats(redis_server, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=str(REPO), REDIS_URL=redis_server.url, REDIS_PASSWORD=redis_server.password
    )
    return subprocess.run(
        [sys.executable, "-m", "trainer.cli", "queue", "stats", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_queue_stats_reports_each_scorer(redis_server, replicas):
    replicas(
        scorer_kwargs={"batch_seconds": 0.1, "max_batch_size": 4, "poison": "poison"},
        queue_cfg={"max_attempts": 1},
    )
    items, _ = brightness_items(48)
    items[0].instruction = "poison"
    config = QueueClientConfig(url=redis_server.url, deadline_s=30, resubmits=0, poll_s=0.1)
    client = RewardClient(["sleep"], config, password=redis_server.password)
    box = {}
    thread = threading.Thread(target=lambda: box.update(scores=client.score_items(items)))
    thread.start()
    during = _stats(redis_server, "--json", "--interval", "0.5")
    thread.join(30)
    client.close()
    after = _stats(redis_server, "--json", "--interval", "0")
    table = _stats(redis_server, "--interval", "0")
    assert during.returncode == 0, during.stderr
    busy = json.loads(during.stdout.splitlines()[0])
    assert busy["scorer"] == "sleep" and busy["throughput"] > 0 and busy["active_consumers"] == 1
    done = json.loads(after.stdout.splitlines()[0])
    assert done["completed"] == 48 and done["dead_letters"] == 1
    assert done["stream_length"] == 0 and done["pending"] == 0 and done["consumers"] == 1
    assert table.stdout.splitlines()[0].split() == [
        "scorer",
        "stream",
        "pending",
        "replicas",
        "dead",
        "completed",
        "items/s",
        "scaled",
    ]
    assert box["scores"].errors["sleep"][0] is not None


def test_queue_stats_without_redis_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "REDIS_PASSWORD")}
    env["PYTHONPATH"] = str(REPO)
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.cli",
            "queue",
            "stats",
            "--redis-url",
            f"unix://{tmp_path}/none.sock",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("spie queue: error: --redis-url unix://") and bad.stderr.count("\n") == 1


def test_replicas_count_from_their_start_until_they_are_gone(redis_server, rdb, replicas):
    from reward_servers.queue.presence import live_replicas

    fast = {"heartbeat_ms": 200, "claim_min_idle_ms": 1000, "block_ms": 200}
    first, second = replicas(queue_cfg=fast), replicas(queue_cfg=fast)
    # Before any job: both registered in the presence hash and as consumers of the group.
    row = json.loads(_stats(redis_server, "--json", "--interval", "0").stdout.splitlines()[0])
    assert row["replicas"] == 2 and row["consumers"] == 2 and row["stream_length"] == 0
    assert _stats(redis_server, "--interval", "0").stdout.splitlines()[1].split()[3] == "2"
    first.stop()  # clean exit (SIGTERM: drain): deregistered at once
    assert set(live_replicas(rdb, "sleep")) == {second.wait_for("consuming", 5).rsplit(" as ", 1)[1].strip()}
    row = json.loads(_stats(redis_server, "--json", "--interval", "0").stdout.splitlines()[0])
    assert row["replicas"] == 1 and row["consumers"] == 1
    second.kill()  # a crash: its entry lapses after its TTL (5 s: 3 heartbeats, at least 5 s)
    assert len(live_replicas(rdb, "sleep", prune=False)) == 1
    time.sleep(5.5)
    assert live_replicas(rdb, "sleep") == {} and rdb.hlen(P.replicas_key("sleep")) == 0
