"""Reward-server benchmarks that measure the server, not the machine's load (`python bench/reward_server.py`).

The headline figures use the `sleep` scorer, a stand-in for a GPU model: every call takes a fixed
time for any batch up to its maximum size and almost no CPU, as a forward pass on a GPU does. On a
shared CPU a model-backed scorer is compute-bound instead (a batch of 32 costs about 32 single
items), so batching cannot help it and its timings follow the machine's load; its figures are
printed beside, labelled as CPU model-backed.

1. Dynamic batching, closed-loop clients (each sends its next request once answered) against a
   `spie serve sleep` subprocess (max_queue_delay_ms 5, max_expect_delay_ms 20):
   a. 32 single-item clients, batching on (max_batch_size 32) and off (1): throughput, the on/off
      ratio (aim: at least 24x; ideal 32 x sleep / (sleep + 5 ms), 29x at 50 ms) and the server's
      batch-size histogram (its Prometheus metrics);
   b. 4 clients at batch 1, 4 and 16 (max_batch_size 64): throughput against the ideal of one batch
      per round of requests (aim: at least 0.8), with the batcher's expectation and without it;
   c. one client at batch 8: its median call time with the expectation and without it.
2. Transport: items/s through gRPC (the subprocess on loopback, raw 256x256 images, requests encoded
   once beforehand as the trainer's client does) against calling the same scorer on the same images
   in this process, at batch 32. gRPC is measured one request at a time (latency: the transfer adds
   to every batch) and pipelined, two requests always in flight (throughput: the server receives the
   next request while the scorer runs). Each is measured in interleaved pairs with in-process
   (alternating which goes first); the median of the per-pair ratios is reported with their range
   and the load average (aim: gRPC / in-process throughput >= 0.9). The same for the tiny Depth
   Anything at 224 px (model-backed, CPU).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import statistics
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

from bench.paired import load_line  # noqa: E402
from protos.spie.reward.v1 import reward_pb2 as pb  # noqa: E402
from reward_servers.base import ScoreBatch, build_scorer  # noqa: E402
from reward_servers.client import ScorerClient  # noqa: E402
from reward_servers.images import make_item  # noqa: E402


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


def start_server(
    folder: str,
    scorer: str,
    kwargs: dict,
    max_batch_size: int,
    metrics_port: int = 0,
    expect_ms: float = 20.0,
    shared_dir: str = "",
):
    """A `spie serve` subprocess (reading shared-memory images from `shared_dir`, if given);
    returns (process, "host:port") once it is SERVING."""
    config = Path(folder) / f"serve_{scorer}_{max_batch_size}_{expect_ms:g}.yaml"
    args = ", ".join(f"{k}: {v}" for k, v in kwargs.items())
    config.write_text(
        f"batching: {{max_batch_size: {max_batch_size}, max_queue_delay_ms: 5, max_queue_size: 4096, "
        f"max_expect_delay_ms: {expect_ms}}}\n"
        f"server: {{metrics_port: {metrics_port}, shared_dir: '{shared_dir}'}}\nscorer: {{{args}}}\n"
    )
    return launch_server(scorer, config)


def launch_server(scorer: str, config: Path, module: str = "trainer.cli"):
    """`python -m <module> serve <scorer> --port 0 --config <config>` in the checkout; returns
    (process, "host:port") once it is SERVING (its output is kept drained), or kills it and raises
    RuntimeError if it does not start within 120 s."""
    cmd = [sys.executable, "-m", module, "serve", scorer, "--port", "0", "--config", str(config)]
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
    raise RuntimeError(f"spie serve {scorer} did not start within 120 s")


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def timed(fn, repeats: int) -> float:
    """Seconds per call of fn over `repeats` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def batch_histogram(metrics_port: int) -> dict[str, int]:
    """Batches per size bucket, from the server's `spie_reward_batch_size` histogram."""
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


def closed_loop(target: str, requests: list, seconds: float) -> tuple[float, float]:
    """One thread per request in `requests`, each sending it again and again for `seconds` (each
    waits for its answer before the next); returns (items/s, median seconds per call)."""
    n = len(requests)
    done, latencies = [0] * n, [[] for _ in range(n)]
    barrier, stop_at = threading.Barrier(n + 1), [0.0]
    with ScorerClient(target, timeout_s=120) as client:
        client.score_request(requests[0])  # warm-up

        def worker(k: int) -> None:
            barrier.wait()
            while time.perf_counter() < stop_at[0]:
                t = time.perf_counter()
                client.score_request(requests[k])
                latencies[k].append(time.perf_counter() - t)
                done[k] += len(requests[k].items)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        stop_at[0] = time.perf_counter() + seconds
        start = time.perf_counter()
        barrier.wait()
        for t in threads:
            t.join(seconds + 120)
        elapsed = time.perf_counter() - start
    return sum(done) / elapsed, statistics.median(x for lat in latencies for x in lat)


def bench_batching(
    folder: str,
    batch_seconds: float,
    seconds: float,
    clients: int = 32,
    expect_ms: float = 20.0,
    size: int = 256,
) -> float:
    print(
        f"\n1a. Dynamic batching: {clients} concurrent single-item clients, {size}x{size} raw images, "
        f"latency-bound `sleep` scorer ({batch_seconds * 1000:.0f} ms per batch of up to 32, a GPU stand-in)"
    )
    pool = images(clients, size=size, seed=1)
    requests = [pb.ScoreRequest(items=[make_item(str(i), pool[i], pool[i], "x")]) for i in range(clients)]
    results = {}
    for label, most in (("off", 1), ("on", 32)):
        port = 9460 + most
        proc, target = start_server(
            folder, "sleep", {"batch_seconds": batch_seconds, "max_batch_size": 32}, most, port, expect_ms
        )
        try:
            results[label], _ = closed_loop(target, requests, seconds)
            print(
                f"  batching {label:>3}: {results[label]:8.1f} items/s, batches by size {batch_histogram(port)}"
            )
        finally:
            stop_server(proc)
    ratio = results["on"] / results["off"]
    ideal = 32 * batch_seconds / (batch_seconds + 0.005)
    print(f"  on/off throughput ratio: {ratio:.2f}x (aim >= 24x; ideal {ideal:.0f}x)")
    return ratio


def bench_clients(
    folder: str, batch_seconds: float, seconds: float, sizes=(1, 4, 16), clients: int = 4
) -> None:
    """`clients` closed-loop clients sending batches of b items to a server batching up to 64: the
    ideal is every round of requests scored as one batch, min(clients x b, 64) / batch_seconds items/s.
    With the batcher's expectation (max_expect_delay_ms 20) and without it (0: the 5 ms window alone)."""
    print(
        f"\n1b. Dynamic batching: {clients} closed-loop clients at batch b, 64x64 raw, `sleep` scorer "
        f"{batch_seconds * 1000:.0f} ms per batch of up to 64, max_queue_delay_ms 5"
    )
    print("| b | ideal items/s | expectation on: items/s (/ ideal), median call ms | off (window alone) |")
    print("|---|---|---|---|")
    worst = math.inf
    for b in sizes:
        pool = images(clients * b, size=64, seed=b)
        requests = [
            pb.ScoreRequest(
                items=[make_item(f"{k}-{i}", pool[k * b + i], pool[k * b + i], "x") for i in range(b)]
            )
            for k in range(clients)
        ]
        ideal = min(clients * b, 64) / batch_seconds
        cells = []
        for expect in (20.0, 0.0):
            proc, target = start_server(
                folder, "sleep", {"batch_seconds": batch_seconds, "max_batch_size": 64}, 64, 0, expect
            )
            try:
                rate, lat = closed_loop(target, requests, seconds)
            finally:
                stop_server(proc)
            cells.append(f"{rate:.0f} ({rate / ideal:.2f}), {lat * 1000:.1f} ms")
            if expect:
                worst = min(worst, rate / ideal)
        print(f"| {b} | {ideal:.0f} | {cells[0]} | {cells[1]} |")
    print(f"  worst / ideal with the expectation: {worst:.2f} (aim >= 0.8)")


def bench_single(folder: str, batch_seconds: float, seconds: float) -> None:
    """One closed-loop client at batch 8: its median call time with and without the expectation."""
    pool = images(8, size=64, seed=3)
    request = pb.ScoreRequest(items=[make_item(str(i), pool[i], pool[i], "x") for i in range(8)])
    cells = []
    for expect in (20.0, 0.0):
        proc, target = start_server(
            folder, "sleep", {"batch_seconds": batch_seconds, "max_batch_size": 64}, 64, 0, expect
        )
        try:
            _, lat = closed_loop(target, [request], seconds)
        finally:
            stop_server(proc)
        cells.append(lat * 1000)
    print(
        f"\n1c. One client at batch 8: median call {cells[0]:.1f} ms with the expectation, {cells[1]:.1f} ms "
        f"without (sleep {batch_seconds * 1000:.0f} ms; aim: at most max_expect_delay_ms 20 more)"
    )


def pipelined(call, payload: bytes, in_flight: int, calls: int) -> float:
    """Seconds per call in steady state with `in_flight` requests always outstanding (a new one is
    sent as soon as the oldest returns): the time from the first response to the last, over the
    `calls` responses after the first, so the start-up (the first request's transfer) is not counted."""
    pending = [call.future(payload, timeout=300) for _ in range(in_flight)]
    pending.pop(0).result()
    start = time.perf_counter()
    for k in range(calls):
        if k + in_flight - 1 < calls:
            pending.append(call.future(payload, timeout=300))
        pending.pop(0).result()
    return (time.perf_counter() - start) / calls


class _FutureOf:
    """`pipelined`'s `call.future(request, timeout)` on a `ScorerClient` (shared memory included)."""

    def __init__(self, client: ScorerClient) -> None:
        self.client = client

    def future(self, request, timeout: float):
        return self.client.score_future(request, timeout)


def bench_transport(
    folder: str, scorer: str, kwargs: dict, label: str, pairs: int, repeats: int, size: int = 256
) -> dict:
    """Interleaved pairs of (in-process, gRPC) timings at batch 32: gRPC one request at a time
    (latency: transfer, parsing and decoding add to every batch) and pipelined, two requests always
    in flight (throughput: the server receives and decodes the next request while the scorer runs,
    as a client with `score_future` or the queue's prefetch does). Returns the medians of the
    per-pair ratios."""
    from reward_servers.server import SERVICE_NAME

    n = 32
    pool = images(n, size)
    local = build_scorer(scorer, **kwargs)
    batch = ScoreBatch(pool, pool[::-1], ["x"] * n)
    request = pb.ScoreRequest(items=[make_item(str(i), pool[i], pool[n - 1 - i], "x") for i in range(n)])
    payload = request.SerializeToString()  # the client's encoding, done once (it is not the server's work)
    shared = tempfile.mkdtemp(prefix="spie-shm-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    proc, target = start_server(folder, scorer, kwargs, n, shared_dir=shared)
    ratios: dict[str, list[float]] = {
        k: [] for k in ("sequential", "pipelined", "shm sequential", "shm pipelined")
    }
    rates: dict[str, list[float]] = {"in-process": [], **{k: [] for k in ratios}}
    load = [os.getloadavg()[0]]
    try:
        with (
            ScorerClient(target, timeout_s=300) as client,
            ScorerClient(target, timeout_s=300, shared_dir=shared) as shm,
        ):
            call = client.channel.unary_unary(
                f"/{SERVICE_NAME}/Score", response_deserializer=pb.ScoreResponse.FromString
            )
            local.score(batch), call(payload, timeout=300), shm.score_request(request)  # warm-up
            for k in range(pairs):
                # "shm": the pixels through shared memory (reward_servers/shm.py); its timing includes
                # the client's copy of every image into the region.
                runs = [
                    ("in-process", lambda: timed(lambda: local.score(batch), repeats)),
                    ("sequential", lambda: timed(lambda: call(payload, timeout=300), repeats)),
                    ("pipelined", lambda: pipelined(call, payload, 2, repeats)),
                    ("shm sequential", lambda: timed(lambda: shm.score_request(request, 300), repeats)),
                    ("shm pipelined", lambda: pipelined(_FutureOf(shm), request, 2, repeats)),
                ]
                if k % 2:
                    runs.reverse()  # alternate the order, so a change of load hits every side alike
                per_item = {name: fn() / n for name, fn in runs}
                for name, t in per_item.items():
                    rates[name].append(1 / t)
                for name in ratios:
                    ratios[name].append(per_item["in-process"] / per_item[name])
            load.append(os.getloadavg()[0])
    finally:
        stop_server(proc)
        shutil.rmtree(shared, ignore_errors=True)
    medians = {name: statistics.median(r) for name, r in ratios.items()}
    local_ms = n / statistics.median(rates["in-process"]) * 1000
    print(f"  {label}; request {len(payload) / 2**20:.1f} MiB; load average {load[0]:.2f} -> {load[1]:.2f}")
    print(
        f"    in-process            {statistics.median(rates['in-process']):8.1f} items/s ({local_ms:.1f} ms per batch)"
    )
    for name, r in ratios.items():
        added = n / statistics.median(rates[name]) * 1000 - local_ms
        print(
            f"    gRPC, {name:<16} {statistics.median(rates[name]):8.1f} items/s ({added:+.1f} ms per batch), "
            f"gRPC/in-process median {medians[name]:.3f}, range {min(r):.3f}-{max(r):.3f} "
            f"(pairs: {' '.join(f'{x:.3f}' for x in r)})"
        )
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-seconds", type=float, default=0.05, help="the sleep scorer's time per batch")
    parser.add_argument("--batching-seconds", type=float, default=5.0, help="measuring time per batching run")
    parser.add_argument("--pairs", type=int, default=7, help="interleaved in-process/gRPC pairs (>= 5)")
    parser.add_argument("--repeats", type=int, default=5, help="calls timed per side of a pair")
    parser.add_argument(
        "--transport-batch-seconds",
        type=float,
        default=0.1,
        help="the sleep scorer's time per batch in part 2",
    )
    parser.add_argument("--part", choices=("1", "2", "all"), default="all", help="which benchmark to run")
    parser.add_argument(
        "--skip-model", action="store_true", help="part 2 without the CPU model-backed figures"
    )
    parser.add_argument(
        "--image-sizes",
        default="256",
        help="part 2's image sides, comma-separated (a small one shows the server's own overhead "
        "without the transfer of 12 MiB requests)",
    )
    parser.add_argument(
        "--batching-sizes",
        type=int,
        nargs="+",
        default=[256, 64],
        help="part 1a's image sides (64: no wire limit)",
    )
    parser.add_argument("--expect-ms", type=float, default=20.0, help="part 1a's max_expect_delay_ms")
    parser.add_argument("--client-batches", type=int, nargs="+", default=[1, 4, 16], help="part 1b's b")
    parser.add_argument("--smoke", action="store_true", help="short runs, 2 pairs, small images, no model")
    args = parser.parse_args()
    if args.smoke:
        args.batching_seconds, args.pairs, args.repeats, args.client_batches = 0.5, 2, 1, [4]
        args.batching_sizes = [64]
        args.image_sizes, args.skip_model = "64", True
    from reward_servers.depth import save_tiny

    print(load_line("load before"))

    print(f"cpus: {os.cpu_count()}, torch threads: {__import__('torch').get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        if args.part in ("1", "all"):
            for side in args.batching_sizes:
                bench_batching(
                    folder, args.batch_seconds, args.batching_seconds, expect_ms=args.expect_ms, size=side
                )
            bench_clients(folder, args.batch_seconds, args.batching_seconds, sizes=args.client_batches)
            bench_single(folder, args.batch_seconds, args.batching_seconds)
        if args.part in ("2", "all"):
            print(f"\n2. gRPC vs in-process at batch 32, raw images, {args.pairs} interleaved pairs")
            ms = args.transport_batch_seconds * 1000
            sleep = {"batch_seconds": args.transport_batch_seconds, "max_batch_size": 32}
            for size in (int(s) for s in args.image_sizes.split(",")):
                label = f"sleep, {ms:.0f} ms per batch (GPU stand-in), {size}x{size} images"
                bench_transport(folder, "sleep", sleep, label, args.pairs, args.repeats, size)
            if not args.skip_model:
                save_tiny(folder)
                depth = {"model_id": folder, "input_size": 224, "max_batch_size": 64}
                bench_transport(
                    folder,
                    "depth_structure",
                    depth,
                    "tiny depth_structure, 224 px (CPU model-backed)",
                    args.pairs,
                    1,
                )
    print(load_line("load after"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
