"""Reward-server benchmarks (`python bench/reward_server.py`).

1. Transport overhead: images/s through gRPC (a `spie serve` subprocess on loopback) against calling
   the same scorer in process, at batch sizes 1, 8 and 32 with 256x256 images, raw and PNG. Requests
   are encoded once beforehand (as the trainer's client does), so the gRPC figure covers serialising,
   the loopback hop, parsing, decoding and batching. Target: gRPC / in-process >= 0.9 at batch 32.
2. Dynamic batching: 32 concurrent single-item clients against the same server with batching on
   (max_batch_size 32, 5 ms delay) and off (max_batch_size 1). Reports throughput, the ratio
   (target >= 4x) and the batch-size histogram the server achieved (from its Prometheus metrics).

The scorer is the tiny Depth Anything of the tests (a 4-layer, 32-wide DINOv2 backbone) run at a
224 px input: model-backed, small enough for a CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# bench/ holds queue.py: take the folder off sys.path so `import queue` finds the standard library.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from protos.spie.reward.v1 import reward_pb2 as pb  # noqa: E402
from reward_servers.base import ScoreBatch, build_scorer  # noqa: E402
from reward_servers.client import ScorerClient  # noqa: E402
from reward_servers.images import make_item  # noqa: E402

SCORER = "depth_structure"
INPUT_SIZE = 224


def images(n: int, size: int = 256, seed: int = 0) -> list[np.ndarray]:
    """n smooth-plus-noise RGB images (PNG compresses them like photos, not like pure noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        f = rng.uniform(1, 6, 3)
        base = np.stack([np.sin(f[c] * (x + y * (c + 1)) * np.pi) for c in range(3)], -1) * 100 + 128
        out.append(np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8))
    return out


def start_server(model_dir: str, max_batch_size: int, delay_ms: float, metrics_port: int):
    config = Path(model_dir) / f"serve_{max_batch_size}.yaml"
    config.write_text(
        f"batching: {{max_batch_size: {max_batch_size}, max_queue_delay_ms: {delay_ms}, max_queue_size: 4096}}\n"
        f"server: {{metrics_port: {metrics_port}}}\n"
        f"scorer: {{model_id: {model_dir}, input_size: {INPUT_SIZE}, max_batch_size: 64}}\n"
    )
    cmd = [sys.executable, "-m", "trainer.cli", "serve", SCORER, "--port", "0", "--config", str(config)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "listening on" in line:
            target = line.split("listening on ")[1].split()[0]
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            with ScorerClient(target) as client:
                client.wait_ready(120)
            return proc, target
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("spie serve did not start")


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def timed(fn, min_seconds: float) -> float:
    """Seconds per call of fn, after one warm-up call, repeated for at least min_seconds."""
    fn()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def bench_transport(model_dir: str, seconds: float) -> None:
    scorer = build_scorer(SCORER, model_id=model_dir, input_size=INPUT_SIZE, max_batch_size=64)
    pool = images(32)
    proc, target = start_server(model_dir, 32, 5.0, 0)
    print("\n1. gRPC vs in-process, 256x256 images, tiny depth_structure at 224 px")
    print(
        f"{'batch':>5} {'encoding':>8} {'in-proc img/s':>14} {'gRPC img/s':>11} {'ratio':>6} {'encode ms':>10} {'MiB/req':>8}"
    )
    try:
        with ScorerClient(target, timeout_s=120) as client:
            for n in (1, 8, 32):
                batch = ScoreBatch(pool[:n], pool[:n][::-1], ["x"] * n)
                t_local = timed(lambda b=batch: scorer.score(b), seconds)
                for encoding in ("raw", "png"):
                    start = time.perf_counter()
                    items = [
                        make_item(str(i), pool[i], pool[n - 1 - i], "x", encoding=encoding) for i in range(n)
                    ]
                    request = pb.ScoreRequest(items=items)
                    encode_ms = (time.perf_counter() - start) * 1000
                    t_grpc = timed(lambda r=request: client.score_request(r), seconds)
                    mib = request.ByteSize() / 2**20
                    print(
                        f"{n:>5} {encoding:>8} {n / t_local:>14.1f} {n / t_grpc:>11.1f} {t_local / t_grpc:>6.2f} "
                        f"{encode_ms:>10.1f} {mib:>8.2f}"
                    )
    finally:
        stop_server(proc)


def batch_histogram(metrics_port: int) -> dict[str, int]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    cumulative = {}
    for le, value in re.findall(
        r'spie_reward_batch_size_bucket\{le="([^"]+)",scorer="[^"]+"\} ([0-9.e+]+)', text
    ):
        cumulative[le] = int(float(value))
    hist, previous = {}, 0
    for le, count in cumulative.items():
        if count - previous:
            hist[f"<={le}"] = count - previous
        previous = count
    return hist


def bench_batching(model_dir: str, seconds: float, clients: int = 32) -> None:
    print(f"\n2. Dynamic batching, {clients} concurrent single-item clients, 256x256 raw images")
    pool = images(clients, seed=1)
    results = {}
    for label, size in (("off", 1), ("on", 32)):
        port = 9460 + size
        proc, target = start_server(model_dir, size, 5.0, port)
        try:
            with ScorerClient(target, timeout_s=120) as client:
                requests = [
                    pb.ScoreRequest(items=[make_item(str(i), pool[i], pool[i], "x")]) for i in range(clients)
                ]
                for r in requests[:4]:
                    client.score_request(r)  # warm-up
                done = [0] * clients
                stop_at = time.perf_counter() + seconds
                start_barrier = threading.Barrier(clients + 1)

                def worker(
                    k: int,
                    stop_at=stop_at,
                    done=done,
                    client=client,
                    requests=requests,
                    barrier=start_barrier,
                ) -> None:
                    barrier.wait()
                    while time.perf_counter() < stop_at:
                        client.score_request(requests[k])
                        done[k] += 1

                threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
                for t in threads:
                    t.start()
                start = time.perf_counter()
                start_barrier.wait()
                for t in threads:
                    t.join(seconds + 120)
                elapsed = time.perf_counter() - start
                results[label] = sum(done) / elapsed
                print(
                    f"batching {label:>3}: {results[label]:8.1f} items/s, batch sizes {batch_histogram(port)}"
                )
        finally:
            stop_server(proc)
    print(f"throughput ratio on/off: {results['on'] / results['off']:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per figure of part 1")
    parser.add_argument(
        "--batching-seconds", type=float, default=10.0, help="measuring time per run of part 2"
    )
    parser.add_argument("--part", choices=("1", "2", "all"), default="all", help="which benchmark to run")
    args = parser.parse_args()
    from reward_servers.depth import save_tiny

    print(f"cpus: {os.cpu_count()}, torch threads: {__import__('torch').get_num_threads()}")
    with tempfile.TemporaryDirectory() as model_dir:
        save_tiny(model_dir)
        if args.part in ("1", "all"):
            bench_transport(model_dir, args.seconds)
        if args.part in ("2", "all"):
            bench_batching(model_dir, args.batching_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
