"""Queue-fabric benchmarks (`python bench/queue.py`), on an embedded Redis with `spie serve` replicas.

1. Added latency: the same batch (8 items, 64x64 raw) scored again and again, one at a time, through
   a direct gRPC call and through the queue (`RewardClient.score_items`) against the same replica of
   the `sleep` scorer with no sleep. Reports p50 and p99 of both and of their difference. A report,
   not a target.
2. Scaling: the `sleep` scorer with a fixed 100 ms per batch of 8 (a stand-in for a GPU), with 1, 2
   and 4 replicas. Throughput is measured in steady state, between 10% and 90% of a large rollout
   batch's completions (warm-up and tail excluded). Target: 4 replicas >= 3.6x one replica.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named queue.py: take its folder off sys.path so `import queue` finds the stdlib.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from reward_servers.client import ScorerClient  # noqa: E402
from reward_servers.images import make_item  # noqa: E402
from reward_servers.queue import protocol as P  # noqa: E402
from reward_servers.queue.embedded import EmbeddedRedis  # noqa: E402
from trainer.rewards.queue import QueueClientConfig, RewardClient  # noqa: E402


def start_replica(redis: EmbeddedRedis, folder: Path, batch_seconds: float, max_batch_size: int):
    """A `spie serve sleep --port 0` process consuming from `redis`; returns (process, grpc target)."""
    config = folder / f"sleep-{time.monotonic_ns()}.yaml"
    config.write_text(
        f"scorer: {{batch_seconds: {batch_seconds}, max_batch_size: {max_batch_size}}}\n"
        f"batching: {{max_batch_size: {max_batch_size}, max_queue_delay_ms: 2}}\n"
    )
    env = dict(os.environ, REDIS_URL=redis.url, REDIS_PASSWORD=redis.password, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer.cli", "serve", "sleep", "--port", "0", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    target = None
    deadline = time.monotonic() + 60
    for line in process.stdout:
        if "listening on" in line:
            target = line.split("listening on ")[1].split()[0]
        if "consuming" in line:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("replica did not start within 60 s")
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    return process, target


def items(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        make_item(
            f"i{i}",
            rng.integers(0, 256, (size, size, 3), np.uint8),
            rng.integers(0, 256, (size, size, 3), np.uint8),
            "edit",
        )
        for i in range(n)
    ]


def latency(redis: EmbeddedRedis, folder: Path, repeats: int) -> None:
    process, target = start_replica(redis, folder, batch_seconds=0.0, max_batch_size=8)
    batch = items(8, 64)
    config = QueueClientConfig(url=redis.url, deadline_s=30, poll_s=0.05)
    direct, queued = [], []
    try:
        with ScorerClient(target) as grpc_client, RewardClient(["sleep"], config, redis.password) as client:
            for _ in range(5):  # warm-up
                grpc_client.score(batch)
                client.score_items(batch)
            for _ in range(repeats):  # interleaved, so both see the same machine load
                t = time.perf_counter()
                grpc_client.score(batch)
                direct.append(time.perf_counter() - t)
                t = time.perf_counter()
                client.score_items(batch)
                queued.append(time.perf_counter() - t)
    finally:
        process.terminate()
        process.wait(30)
    d, q = np.array(direct) * 1000, np.array(queued) * 1000
    print(
        f"\n1. Added latency per batch of 8 (64x64 raw), {repeats} sequential batches, sleep scorer at 0 ms"
    )
    print("| path | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| direct gRPC | {np.percentile(d, 50):.2f} | {np.percentile(d, 99):.2f} |")
    print(f"| Redis queue | {np.percentile(q, 50):.2f} | {np.percentile(q, 99):.2f} |")
    print(
        f"| added by the queue | {np.percentile(q, 50) - np.percentile(d, 50):.2f} | {np.percentile(q, 99) - np.percentile(d, 99):.2f} |"
    )


def steady_throughput(redis: EmbeddedRedis, n: int) -> tuple[float, float]:
    """Score n items through the queue; return (steady items/s between 10% and 90%, end-to-end items/s)."""
    counter = P.connect(redis.url, redis.password)
    base = int(counter.get(P.done_key("sleep")) or 0)
    config = QueueClientConfig(url=redis.url, deadline_s=120, poll_s=0.1, max_in_flight=4096)
    client = RewardClient(["sleep"], config, redis.password)
    batch = items(n, 16, seed=n)
    marks: dict[float, float] = {}
    box = {}
    start = time.monotonic()
    thread = threading.Thread(target=lambda: box.update(scores=client.score_items(batch)))
    thread.start()
    while thread.is_alive():
        done = int(counter.get(P.done_key("sleep")) or 0) - base
        for frac in (0.1, 0.9):
            if frac not in marks and done >= frac * n:
                marks[frac] = (time.monotonic(), done)
        time.sleep(0.005)
    total = time.monotonic() - start
    thread.join()
    client.close()
    counter.close()
    assert not box["scores"].failed(), "some items failed"
    (t0, d0), (t1, d1) = marks[0.1], marks[0.9]
    return (d1 - d0) / (t1 - t0), n / total


def scaling(redis: EmbeddedRedis, folder: Path, seconds: float) -> None:
    processes, rows = [], []
    try:
        for replicas in (1, 2, 4):
            while len(processes) < replicas:
                processes.append(start_replica(redis, folder, batch_seconds=0.1, max_batch_size=8)[0])
            n = int(80 * replicas * seconds)  # about `seconds` of work at the ideal rate
            steady, end_to_end = steady_throughput(redis, n)
            rows.append((replicas, n, steady, end_to_end))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
    one = rows[0][2]
    print("\n2. Scaling, sleep scorer: 100 ms per batch of 8 (ideal: 80 items/s per replica)")
    print("| replicas | items | steady items/s | end-to-end items/s | steady / 1 replica |")
    print("|---|---|---|---|---|")
    for replicas, n, steady, end_to_end in rows:
        print(f"| {replicas} | {n} | {steady:.1f} | {end_to_end:.1f} | {steady / one:.2f}x |")
    ratio = rows[-1][2] / one
    print(f"\n4 replicas / 1 replica = {ratio:.2f}x (target >= 3.6x): {'PASS' if ratio >= 3.6 else 'FAIL'}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=200, help="batches timed for the latency report")
    parser.add_argument("--seconds", type=float, default=4.0, help="ideal seconds of work per scaling run")
    args = parser.parse_args()
    with EmbeddedRedis() as redis, tempfile.TemporaryDirectory() as tmp:
        latency(redis, Path(tmp), args.repeats)
        scaling(redis, Path(tmp), args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
