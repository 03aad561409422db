"""SPO's judge over the Redis queue against the same judge in process (`train.objective: spo`).

SPO puts a scoring round trip inside every denoising step: each step's pool of K candidates per
input (their predicted clean images, the step in the metadata) must be judged. `python bench/spo.py`
times the sampling and judging of one SPO epoch (`trainer.stepwise.sample_spo`, the tiny model) with
the `sleep` scorer, a stand-in for a GPU judge (a fixed time per call whatever the batch, almost no
CPU), in four ways, interleaved (one epoch of each per round, the order rotating, the same weights
and noise), and reports medians:

- in process, sync: the judge called at each step, the chain waiting (as SPO's own loop does);
- in process, async: each step's candidates handed to the judge thread, the chain going on (steps
  decoded while a call is in flight go together in the next call);
- queue, sync / async: the same through Redis to one `spie-reward serve sleep` replica.

The figure of merit is queue async / in process sync (aim: <= 1.3): the fabric against the plain
loop. The batch sizes the replica scored come from its Prometheus histogram (`spie_reward_batch_size`).
The update after sampling is the same whatever the transport, so it is left out of the times.

A step's jobs reach Redis in one MULTI/EXEC (`RewardClient._submit`), so a waiting replica reads them
together: with a plain pipeline the replica woke on the first XADDs and scored batches of 1-8 first
(144 judge calls where 120 would do, on 12 epochs; each costs a full call on a GPU).
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/ holds queue.py: take the folder off sys.path so `import queue` finds the standard library.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

from bench.paired import load_line  # noqa: E402

os.chdir(ROOT)  # configs/ and the tiny model cache are relative to the checkout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_replica(
    redis, folder: Path, batch_seconds: float, max_batch: int, metrics_port: int, delay_ms: float
):
    """A `spie-reward serve sleep` process consuming from `redis`, its /metrics on `metrics_port`."""
    config = folder / "sleep.yaml"
    config.write_text(
        f"scorer: {{batch_seconds: {batch_seconds}, max_batch_size: {max_batch}}}\n"
        f"batching: {{max_batch_size: {max_batch}, max_queue_delay_ms: {delay_ms}}}\n"
        f"server: {{metrics_port: {metrics_port}}}\n"
    )
    env = dict(os.environ, REDIS_URL=redis.url, REDIS_PASSWORD=redis.password, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "reward_servers", "serve", "sleep", "--port", "0", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    for line in process.stdout:
        if "consuming" in line:
            break
        if time.monotonic() > deadline:
            raise RuntimeError("replica did not start within 120 s")
    threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()
    return process


def batch_histogram(port: int) -> dict[str, float]:
    """The replica's `spie_reward_batch_size` histogram: cumulative bucket counts, sum and count."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("spie_reward_batch_size_bucket"):
            out["le" + line.split('le="')[1].split('"')[0]] = float(line.split()[-1])
        elif line.startswith(("spie_reward_batch_size_sum", "spie_reward_batch_size_count")):
            out[line.split()[0].split("{")[0].rsplit("_", 1)[1]] = float(line.split()[-1])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16, help="inputs per shard")
    parser.add_argument("--shards", type=int, default=2, help="shards (sampling batches) per epoch")
    parser.add_argument("--steps", type=int, default=6, help="denoising steps (pools from step 0)")
    parser.add_argument("--pool", type=int, default=4, help="candidates per step (SPO's default 4)")
    parser.add_argument("--sleep", type=float, default=0.05, help="judge time per scorer call, s")
    parser.add_argument("--max-batch", type=int, default=64, help="the judge's largest batch")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="the replica's max_queue_delay_ms")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="2 inputs x 1 shard, 2 steps, pool 2, 10 ms judge, 2 rounds (the smoke test)",
    )
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.shards, args.steps, args.pool, args.sleep, args.rounds = 2, 1, 2, 2, 0.01, 2
    print(load_line("load before"))

    import torch

    from reward_servers.queue.embedded import EmbeddedRedis
    from trainer.config import load_config, with_overrides
    from trainer.data.inputs import load_inputs
    from trainer.engine.local import LocalEngine
    from trainer.engine.shards import epoch_generator, plan_epoch
    from trainer.rewards.inprocess import InProcessRewards
    from trainer.rewards.queue import QueueClientConfig, RewardClient
    from trainer.stepwise import sample_spo

    torch.set_num_threads(args.threads)
    scorer = f"{{name: sleep, weight: 100, kwargs: {{batch_seconds: {args.sleep}, max_batch_size: {args.max_batch}}}}}"
    config = load_config(
        "configs/tiny.yaml",
        [
            "run.quiet=true",
            "train.objective=spo",
            "sample.nb_gen=1",
            "train.spo.start_step=0",
            f"train.spo.pool_size={args.pool}",
            f"sample.num_steps={args.steps}",
            f"sample.batch_size={args.batch}",
            f"sample.num_batches_per_epoch={args.shards}",
            f"reward.scorers=[{scorer}]",
        ],
    )
    engine = LocalEngine(config)
    inputs = load_inputs(config.data, config.model.resolution, seed=0)
    port = free_port()
    times: dict[str, list[float]] = {}
    pools = judged = 0
    with tempfile.TemporaryDirectory(prefix="spie-spo-bench-") as tmp:
        redis = EmbeddedRedis().start()
        replica = start_replica(redis, Path(tmp), args.sleep, args.max_batch, port, args.delay_ms)
        client = RewardClient(
            ["sleep"],
            QueueClientConfig(url=redis.url, run_id="bench", deadline_s=60, poll_s=0.05),
            password=redis.password,
        )
        local = InProcessRewards(config.reward)
        configs = {p: with_overrides(config, [f"sample.pipeline={p}"]) for p in ("sync", "async")}
        rewards = {"in process": local, "queue": client}
        modes = [(t, p) for t in ("in process", "queue") for p in ("sync", "async")]
        try:
            before = None
            for r in range(args.rounds):
                if r == 1:
                    before = batch_histogram(port)  # round 0 is warm-up
                for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
                    transport, pipeline = mode
                    shards = plan_epoch(inputs, config, r, epoch_generator(0, r), engine.latent_shape)
                    _, _, _, info = sample_spo(engine, rewards[transport], shards, configs[pipeline], False)
                    if r:
                        for key in (
                            "time_sample_score_s",
                            "time_sampling_s",
                            "time_judging_s",
                            "time_judging_wait_s",
                        ):
                            times.setdefault(f"{transport}, {pipeline}|{key}", []).append(info[key])
                        pools, judged = info["spo.pools"], info["spo.judged"]
                        times.setdefault(f"{transport}, {pipeline}|calls", []).append(info["spo.judge_calls"])
            after = batch_histogram(port)
        finally:
            client.close()
            replica.terminate()
            replica.wait(30)
            redis.stop()
    med = {k: statistics.median(v) for k, v in times.items()}
    steps = int(judged // (args.pool * args.batch * args.shards)) or 1
    print(
        f"\nSPO epoch, tiny model ({args.steps} DDIM steps, {steps} pooled), {args.shards} shards x {args.batch} "
        f"inputs x {args.pool} candidates: {int(judged)} candidates judged in {steps * args.shards} calls of "
        f"{args.batch * args.pool}; sleep judge {args.sleep * 1000:.0f} ms per call; sampling + judging, "
        f"median of {args.rounds - 1} interleaved rounds after a warm-up one, seconds"
    )
    print(
        "| transport, pipeline | s / epoch | / in process, same pipeline | sampling, s | judge calls | "
        "judge calls, s (summed) | wait after sampling, s |"
    )
    print("|---|---|---|---|---|---|---|")
    for key in ("in process, sync", "in process, async", "queue, sync", "queue, async"):
        epoch = med[f"{key}|time_sample_score_s"]
        same = med[f"in process, {key.split(', ')[1]}|time_sample_score_s"]
        print(
            f"| {key} | {epoch:.3f} | {epoch / same:.3f} | {med[f'{key}|time_sampling_s']:.3f} "
            f"| {med[f'{key}|calls']:.0f} "
            f"| {med[f'{key}|time_judging_s']:.3f} "
            f"| {med[f'{key}|time_judging_wait_s']:.3f} |"
        )
    for pipeline in ("sync", "async"):
        ratio = (
            med[f"queue, {pipeline}|time_sample_score_s"] / med[f"in process, {pipeline}|time_sample_score_s"]
        )
        verdict = "PASS" if ratio <= 1.3 else "FAIL"
        print(f"queue / in process, {pipeline}: {ratio:.3f} (aim <= 1.3): {verdict}")
    count = after["count"] - before["count"]
    mean = (after["sum"] - before["sum"]) / max(count, 1)
    buckets = [k for k in after if k.startswith("le")]
    seen, prev = [], 0.0
    for k in buckets:
        n = (after[k] - before.get(k, 0.0)) - prev
        prev += n
        if n:
            seen.append(f"<= {k[2:]}: {int(n)}")
    print(
        f"replica batches (queue runs after warm-up): {int(count)} batches, mean {mean:.1f} items "
        f"({', '.join(seen)}); pools per epoch {int(pools)}"
    )
    return 0


if __name__ == "__main__":
    code = main()
    print(load_line("load after"))
    sys.exit(code)
