"""What one Redis carries (`python bench/redis_scale.py`): items/s and bytes/s through the queue with N
producers and M replicas on loopback, and Redis's own CPU time per item, at 512 and 1024 px, raw and
PNG. The figures of docs/scale.md.

Each producer is a `RewardClient` (a thread of this process) scoring batches of `--batch` edits
(edited + source image, the trainer's Item) again and again; each replica a `spie serve sleep`
subprocess with a 0 s sleep, so the scorer costs nothing and the fabric is all that is measured.
For each setting the run lasts `--seconds`; Redis's INFO gives its CPU seconds (user + sys of the
server process) and the bytes it received and sent over the run.

`--paths inline blob` (default both): inline, the payloads go through Redis; on the blob path
(reward.queue.blob_dir, reward_servers/queue/blobs.py) they go through a folder in /dev/shm and
Redis carries references only.

On a shared 2-core machine the producers, replicas and Redis compete for the cores, so the
achieved items/s is a floor; Redis is single-threaded, so what sizes a cluster is its CPU time
per item: one Redis core carries at most 1 / (CPU s per item) items/s, and its network the bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds queue.py: take the folder off sys.path so `import queue` finds the standard library.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from bench.paired import load_line  # noqa: E402
from bench.queue import start_replica  # noqa: E402
from bench.reward_server import images  # noqa: E402
from reward_servers.images import make_item  # noqa: E402
from reward_servers.queue import protocol as P  # noqa: E402
from reward_servers.queue.embedded import EmbeddedRedis  # noqa: E402
from trainer.rewards.queue import QueueClientConfig, RewardClient  # noqa: E402


def redis_counters(client) -> tuple[float, int, int]:
    """(CPU seconds of the Redis server, bytes it received, bytes it sent) so far."""
    cpu, stats = client.info("cpu"), client.info("stats")
    return (
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        int(stats["total_net_input_bytes"]),
        int(stats["total_net_output_bytes"]),
    )


def run_setting(
    redis: EmbeddedRedis,
    size: int,
    encoding: str,
    producers: int,
    batch: int,
    seconds: float,
    blob_dir: str = "",
):
    """Score for `seconds` with `producers` clients (payloads through `blob_dir` when given); returns
    a dict of the figures."""
    pool = images(batch, size=size, seed=size)
    items = [
        make_item(f"i{i}", pool[i], pool[(i + 1) % batch], "edit", encoding=encoding) for i in range(batch)
    ]
    item_bytes = sum(len(it.SerializeToString()) for it in items) / batch
    config = QueueClientConfig(
        url=redis.url, deadline_s=120, poll_s=0.05, encoding=encoding, blob_dir=blob_dir
    )
    clients = [RewardClient(["sleep"], config, redis.password) for _ in range(producers)]
    for c in clients:
        c.score_items(items[:1])  # warm-up
    counter = P.connect(redis.url, redis.password)
    done = [0] * producers
    stop_at = [0.0]
    barrier = threading.Barrier(producers + 1)

    def produce(k: int) -> None:
        barrier.wait()
        while time.monotonic() < stop_at[0]:
            clients[k].score_items(items)
            done[k] += batch

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    for t in threads:
        t.start()
    cpu0, in0, out0 = redis_counters(counter)
    stop_at[0] = time.monotonic() + seconds
    start = time.monotonic()
    barrier.wait()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    cpu1, in1, out1 = redis_counters(counter)
    counter.close()
    for c in clients:
        c.close()
    n = sum(done)
    cpu_per_item = (cpu1 - cpu0) / n
    return {
        "items": n,
        "item_bytes": item_bytes,
        "items_s": n / wall,
        "in_MBs": (in1 - in0) / wall / 1e6,
        "out_MBs": (out1 - out0) / wall / 1e6,
        "redis_cpu": (cpu1 - cpu0) / wall,
        "cpu_ms_item": cpu_per_item * 1000,
        "cap_items_s": 1 / cpu_per_item,
        "cap_MBs": item_bytes / cpu_per_item / 1e6,  # payload carried per second of Redis CPU
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--encodings", nargs="+", default=["raw", "png"])
    parser.add_argument("--setups", nargs="+", default=["1x1", "2x2"], help="N producers x M replicas")
    parser.add_argument("--batch", type=int, default=8, help="edits per producer call")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per setting")
    parser.add_argument("--paths", nargs="+", default=["inline", "blob"], choices=["inline", "blob"])
    parser.add_argument("--smoke", action="store_true", help="64 px, raw, 1x1, 1 s (the smoke test)")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.encodings, args.setups, args.batch, args.seconds = [64], ["raw"], ["1x1"], 2, 1.0
    print(load_line("load before"))
    print(
        "| path | px | encoding | N producers x M replicas | item MB | items/s | in MB/s | out MB/s | "
        "Redis CPU (cores) | Redis CPU ms / item | one Redis core: items/s | one Redis core: payload MB/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with (
        EmbeddedRedis() as redis,
        tempfile.TemporaryDirectory() as tmp,
        tempfile.TemporaryDirectory(dir=shm, prefix="spie-blobs-") as blobs,
    ):
        replicas = []
        try:
            for setup in args.setups:
                producers, m = (int(x) for x in setup.split("x"))
                while len(replicas) < m:
                    replicas.append(start_replica(redis, Path(tmp), 0.0, args.batch, blobs)[0])
                while len(replicas) > m:
                    proc = replicas.pop()
                    proc.terminate()
                    proc.wait(30)
                for path, size, encoding in itertools.product(args.paths, args.sizes, args.encodings):
                    folder = blobs if path == "blob" else ""
                    r = run_setting(redis, size, encoding, producers, args.batch, args.seconds, folder)
                    print(
                        f"| {path} | {size} | {encoding} | {producers} x {m} | {r['item_bytes'] / 1e6:.2f} | "
                        f"{r['items_s']:.1f} | {r['in_MBs']:.0f} | {r['out_MBs']:.0f} | {r['redis_cpu']:.2f} | "
                        f"{r['cpu_ms_item']:.3f} | {r['cap_items_s']:.0f} | {r['cap_MBs']:.0f} |",
                        flush=True,
                    )
        finally:
            for proc in replicas:
                proc.terminate()
            for proc in replicas:
                proc.wait(30)
    print(load_line("load after"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
