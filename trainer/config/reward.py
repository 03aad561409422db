"""The `reward` section: the scorers and how their scores are gathered (in process, the Redis
queue, gRPC)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from trainer.config.reward_scaling import RayRewardConfig, check_reward_scaling


@dataclass(frozen=True)
class ScorerConfig:
    # Registered scorer name, e.g. "brightness", "ssim_structure", "vlm_judge".
    name: str = "brightness"
    # Role in SPIE's ranking: "semantic" (did the edit do what was asked) or "structural".
    role: Literal["semantic", "structural"] = "semantic"
    # Weight of this scorer: in the PPO reward (sum of weighted, per-scorer normalised scores) and
    # in SPIE's ranking (weight x the scorer's score standardised per sampling batch).
    weight: float = 1.0
    # Keyword arguments for the scorer's constructor.
    kwargs: dict[str, Any] = field(default_factory=dict)


# Seconds to gather one rollout batch's scores before the missing jobs are resubmitted.
DEFAULT_DEADLINE_S = 120.0


@dataclass(frozen=True)
class GroundingConfig:
    """Grounded edit masks (`reward.grounding`): when the data has no masks, each input's object is
    found by a `spie serve grounding` server (GroundingDINO box + SAM mask), once per input."""

    # "host:port" of the grounding server; empty: off (the masks come with the data or not at all).
    server: str = ""
    # Metadata field naming the object to find; inputs without it use their instruction.
    phrase_key: str = "phrase"
    # Seconds one Ground call may take (inputs are sent in chunks of `batch_size`).
    timeout_s: float = 120.0
    # Inputs per Ground call.
    batch_size: int = 16


@dataclass(frozen=True)
class QueueConfig:
    """How the trainer's queue client talks to Redis (`reward.queue`, with `reward.transport: queue`)."""

    # Times the missing jobs are resubmitted after a deadline before scoring fails.
    resubmits: int = 1
    # Most jobs waiting or being scored in one scorer's stream (backpressure).
    max_in_flight: int = 1024
    # Seconds an item blob lives in Redis if no scorer releases it (a crashed run).
    blob_ttl_s: int = 3600
    # Wire encoding of images: "raw" (fast on loopback) or "png" (smaller across slow links).
    encoding: Literal["raw", "png"] = "raw"
    # Seconds between full checks of the missing results (signals wake the gatherer sooner).
    poll_s: float = 0.5
    # The blob path (reward_servers/queue/blobs.py): a folder the trainer and every replica share
    # (/dev/shm/... on one machine, a shared mount across machines; the replicas' queue.blob_dir or
    # SPIE_BLOB_DIR names it as they see it). Item payloads go there, one file per rollout batch,
    # and Redis carries only references, so Redis's CPU and network no longer grow with image
    # size (docs/scale.md). Empty: SPIE_BLOB_DIR, else inline (payloads in Redis).
    blob_dir: str = ""


@dataclass(frozen=True)
class GrpcRewardsConfig:
    """The reward servers of `reward.transport: grpc`: one `spie serve <scorer>` per scorer, called
    directly (no queue). The auth token, if the servers want one, comes from SPIE_REWARD_TOKEN, as
    for `spie serve` and `spie score`."""

    # Scorer name -> "host:port" of the server that hosts it; every scorer of reward.scorers needs one.
    servers: dict[str, str] = field(default_factory=dict)
    # PEM file of the CA that signed the servers' certificates; empty: plaintext (loopback or a
    # private network only).
    tls_ca: str = ""
    # Most items per Score request (a batch goes in chunks of this many, sent together).
    max_items_per_request: int = 64
    # Times a request that failed with UNAVAILABLE, DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED is sent
    # again before scoring fails; each try has reward.deadline_s.
    retries: int = 1
    # Servers on this machine only: send raw pixels through shared-memory regions in this folder
    # (a tmpfs such as /dev/shm/spie; each server's server.shared_dir names the same folder;
    # reward_servers/shm.py) instead of the socket: 12 MiB requests then cost one copy, not gRPC's
    # transfer (reward_servers/README.md). Empty: the socket.
    shared_dir: str = ""


@dataclass(frozen=True)
class RewardConfig:
    # Scorers judging each edit.
    scorers: tuple[ScorerConfig, ...] = (ScorerConfig(),)
    # How scores are gathered: "inprocess" (scorers run inside the trainer), "queue" (rollout
    # batches go to Redis streams and `spie serve` replicas score them) or "grpc" (Score requests
    # to the servers of `reward.grpc.servers`, each with reward.deadline_s).
    transport: Literal["inprocess", "queue", "grpc"] = "inprocess"
    # Redis for the queue; empty: the REDIS_URL environment variable, else an embedded redis-server
    # started for the run. The password comes from the URL or REDIS_PASSWORD.
    redis_url: str = ""
    # Start local `spie serve` replicas for every scorer (false: they run elsewhere, e.g. compose).
    launch_servers: bool = True
    # Local replicas per scorer when launch_servers is true.
    replicas: int = 1
    # Where the queue's replicas run: "local" (child processes), "ray" (Ray actors placed and
    # scaled per reward.ray) or "none" (elsewhere); launch_servers: false means "none".
    launch: Literal["local", "ray", "none"] = "local"
    # Address the run's embedded Redis binds with launch ray: 127.0.0.1 (one machine), or the head
    # node's address on a cluster so replicas on other nodes reach it (always with a password);
    # auto: the driver node's address as Ray sees it.
    redis_host: str = "127.0.0.1"
    # Ray replica actors: resources, restarts and autoscaling per scorer (trainer/config/reward_scaling.py).
    ray: RayRewardConfig = field(default_factory=RayRewardConfig)
    # Seconds a local replica may take to load its model and start consuming.
    server_start_timeout_s: float = 120.0
    # Seconds to gather one rollout batch's scores before the missing jobs are resubmitted (the one
    # scoring deadline). The loop waits at most 2.5 x this for one batch's scores before it stops.
    deadline_s: float = DEFAULT_DEADLINE_S
    # The queue client's other settings.
    queue: QueueConfig = field(default_factory=QueueConfig)
    # The servers of the grpc transport.
    grpc: GrpcRewardsConfig = field(default_factory=GrpcRewardsConfig)
    # Grounded edit masks for data without masks (SPIE's Grounded-SAM step).
    grounding: GroundingConfig = field(default_factory=GroundingConfig)

    def __post_init__(self) -> None:
        check_reward_scaling(self)
