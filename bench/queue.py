"""Queue-fabric benchmarks (`python bench/queue.py`), on an embedded Redis with `spie serve` replicas.

Each part runs at every `--batch` size (default 8 and 64).

1. Added latency: the same batch (64x64 raw) scored again and again, one at a time, through a direct
   gRPC call and through the queue (`RewardClient.score_items`) against the same replica of the
   `sleep` scorer with no sleep, in pairs whose order alternates, after 5 warm-ups of each. Reports
   p50 and p99 of both, of the per-pair differences (what the queue added to each batch), and the
   median and spread of the per-pair ratios (aim at batch 64: queue / direct <= 1.3).
2. Scaling: the `sleep` scorer with a fixed 100 ms per batch (a stand-in for a GPU), with 1, 2 and 4
   replicas. Throughput is measured in steady state, between 10% and 90% of a large rollout batch's
   completions (warm-up and tail excluded). Aims: 2 replicas >= 1.8x and 4 >= 3.6x one replica.
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
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench.paired import load_line, paired_times, ratios, spread, timer  # noqa: E402
from reward_servers.client import ScorerClient  # noqa: E402
from reward_servers.images import make_item  # noqa: E402
from reward_servers.queue import protocol as P  # noqa: E402
from reward_servers.queue.embedded import EmbeddedRedis  # noqa: E402
from trainer.rewards.queue import QueueClientConfig, RewardClient  # noqa: E402


def start_replica(
    redis: EmbeddedRedis, folder: Path, batch_seconds: float, max_batch_size: int, blob_dir: str = ""
):
    """A `spie serve sleep --port 0` process consuming from `redis` (reading payloads sent by
    reference from `blob_dir`, if given); returns (process, grpc target)."""
    config = folder / f"sleep-{time.monotonic_ns()}.yaml"
    config.write_text(
        f"scorer: {{batch_seconds: {batch_seconds}, max_batch_size: {max_batch_size}}}\n"
        f"batching: {{max_batch_size: {max_batch_size}, max_queue_delay_ms: 2}}\n"
    )
    env = dict(os.environ, REDIS_URL=redis.url, REDIS_PASSWORD=redis.password, PYTHONPATH=str(ROOT))
    if blob_dir:
        env["SPIE_BLOB_DIR"] = blob_dir
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


def latency(redis: EmbeddedRedis, folder: Path, repeats: int, batch_size: int) -> None:
    blobs = tempfile.mkdtemp(prefix="spie-blobs-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    process, target = start_replica(redis, folder, 0.0, batch_size, blob_dir=blobs)
    batch = items(batch_size, 64)
    config = QueueClientConfig(url=redis.url, deadline_s=30, poll_s=0.05)
    blob_config = QueueClientConfig(url=redis.url, deadline_s=30, poll_s=0.05, blob_dir=blobs)
    try:
        with (
            ScorerClient(target) as grpc_client,
            RewardClient(["sleep"], config, redis.password) as client,
            RewardClient(["sleep"], blob_config, redis.password) as blob_client,
        ):
            direct, queued = paired_times(
                timer(lambda: grpc_client.score(batch)),
                timer(lambda: client.score_items(batch)),
                repeats,
                warmup=5,
            )
            # The blob path (payloads through a folder in /dev/shm, references in Redis), its own pairs.
            direct_b, blobbed = paired_times(
                timer(lambda: grpc_client.score(batch)),
                timer(lambda: blob_client.score_items(batch)),
                repeats,
                warmup=5,
            )
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(blobs, ignore_errors=True)
    d, q = np.array(direct) * 1000, np.array(queued) * 1000
    diff = q - d  # per pair: what the queue added to that batch
    print(
        f"\n1. Added latency per batch of {batch_size} (64x64 raw), {repeats} sequential pairs (order alternating, "
        "5 warm-ups of each), sleep scorer at 0 ms"
    )
    print("| path | p50 ms | p99 ms |")
    print("|---|---|---|")
    print(f"| direct gRPC | {np.percentile(d, 50):.2f} | {np.percentile(d, 99):.2f} |")
    print(f"| Redis queue | {np.percentile(q, 50):.2f} | {np.percentile(q, 99):.2f} |")
    print(
        f"| added by the queue (paired differences) | {np.percentile(diff, 50):.2f} | {np.percentile(diff, 99):.2f} |"
    )
    print(f"queue / direct gRPC, paired: {spread(ratios(queued, direct))}")
    print(
        f"queue on the blob path / direct gRPC, paired: {spread(ratios(blobbed, direct_b))} "
        f"(blob path p50 {np.percentile(blobbed, 50) * 1000:.2f} ms)"
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
    end = (start + total, n)  # a short run can finish between two looks at the counter
    (t0, d0), (t1, d1) = marks.get(0.1, (start, 0)), marks.get(0.9, end)
    return (d1 - d0) / (t1 - t0), n / total


def scaling(redis: EmbeddedRedis, folder: Path, seconds: float, batch_size: int, counts=(1, 2, 4)) -> None:
    processes, rows = [], []
    per_replica = batch_size / 0.1  # ideal items/s of one replica: a batch per 100 ms
    try:
        for replicas in counts:
            while len(processes) < replicas:
                processes.append(
                    start_replica(redis, folder, batch_seconds=0.1, max_batch_size=batch_size)[0]
                )
            n = int(per_replica * replicas * seconds)  # about `seconds` of work at the ideal rate
            steady, end_to_end = steady_throughput(redis, n)
            rows.append((replicas, n, steady, end_to_end))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
    one = rows[0][2]
    print(
        f"\n2. Scaling, sleep scorer: 100 ms per batch of {batch_size} (ideal: {per_replica:.0f} items/s per replica)"
    )
    print("| replicas | items | steady items/s | end-to-end items/s | steady / 1 replica |")
    print("|---|---|---|---|---|")
    for replicas, n, steady, end_to_end in rows:
        print(f"| {replicas} | {n} | {steady:.1f} | {end_to_end:.1f} | {steady / one:.2f}x |")
    for replicas, _, steady, _ in rows[1:]:
        aim = {2: 1.8, 4: 3.6}.get(replicas, 0.9 * replicas)
        ratio = steady / one
        print(
            f"{replicas} replicas / 1 replica = {ratio:.2f}x (aim >= {aim}x): {'PASS' if ratio >= aim else 'FAIL'}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=200, help="batches timed for the latency report")
    parser.add_argument("--seconds", type=float, default=4.0, help="ideal seconds of work per scaling run")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[8, 64], help="batch sizes (each: both parts)"
    )
    parser.add_argument(
        "--replicas", type=int, nargs="+", default=[1, 2, 4], help="replica counts (first: 1)"
    )
    parser.add_argument("--part", choices=("1", "2", "all"), default="all")
    parser.add_argument("--smoke", action="store_true", help="20 pairs, batch 8, 1 and 2 replicas, 1 s")
    args = parser.parse_args()
    if args.smoke:
        args.repeats, args.seconds, args.batch, args.replicas = 20, 1.0, [8], [1, 2]
    print(load_line("load before"))
    with EmbeddedRedis() as redis, tempfile.TemporaryDirectory() as tmp:
        for batch_size in args.batch:
            if args.part in ("1", "all"):
                latency(redis, Path(tmp), args.repeats, batch_size)
            if args.part in ("2", "all"):
                scaling(redis, Path(tmp), args.seconds, batch_size, tuple(args.replicas))
    print(load_line("load after"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
