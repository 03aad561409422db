"""Scoring through gRPC reward servers (`reward.transport: grpc`): the trainer calls each scorer's
`spie serve` server (`reward.grpc.servers`: scorer -> "host:port") directly, without a queue.

A batch goes to every scorer's server at once, in Score requests of at most
`reward.grpc.max_items_per_request` items, each with the deadline `reward.deadline_s`. A request
that fails with UNAVAILABLE (the server is down, restarting or still loading) is sent again with
backoff (50 ms doubling to 1 s), waiting for the server to be reachable, for as long as
`reward.deadline_s` allows from its first try: these retries do not count against
`reward.grpc.retries`, so a server that restarts within the deadline is survived by default. One
that fails with DEADLINE_EXCEEDED or RESOURCE_EXHAUSTED (each try had a whole deadline) is sent
again up to `reward.grpc.retries` times. Any other failure, or one left when those run out, stops
scoring with one line naming the scorer and the server. Items the server could not score come back as per-item errors, as with the queue.
The servers batch requests from several trainers themselves (`reward_servers.batcher`).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.client import ScorerClient
from reward_servers.images import make_item
from trainer.config import Config
from trainer.errors import UserError
from trainer.rewards.scores import Scores

TOKEN_ENV = "SPIE_REWARD_TOKEN"  # as `spie serve` / `spie score` (reward_servers.cli)
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)


def open_clients(config: Config, token: str | None = None) -> dict:
    """scorer -> a `ScorerClient` of its server, once the server is SERVING (within
    `reward.server_start_timeout_s`) and hosts that scorer; `UserError` naming the field otherwise."""
    r = config.reward
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    clients: dict[str, ScorerClient] = {}
    try:
        for sc in r.scorers:
            target = r.grpc.servers[sc.name]
            where = f"reward.grpc.servers.{sc.name}={target}"
            try:
                client = ScorerClient(
                    target,
                    token=token,
                    tls_ca=r.grpc.tls_ca or None,
                    timeout_s=r.deadline_s,
                    shared_dir=r.grpc.shared_dir,
                )
            except ValueError as err:  # shm.SharedMemoryError: the folder cannot be made
                raise UserError(f"reward.grpc.{err}") from err
            clients[sc.name] = client
            try:
                client.wait_ready(timeout_s=r.server_start_timeout_s)
                info = client.info()
            except (TimeoutError, grpc.RpcError) as err:
                raise UserError(f"{where}: {_one_line(err)}") from err
            if info.scorer != sc.name:
                raise UserError(f"{where}: the server hosts {info.scorer!r}, not {sc.name!r}")
    except BaseException:
        for c in clients.values():
            c.close()
        raise
    return clients


def _one_line(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError):
        return f"{err.code().name}: {err.details()}"
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


class GrpcRewards:
    """`score(rollout) -> Scores` through the reward servers of `reward.grpc.servers`.

    Args:
        config: the run configuration (`reward.scorers`, `reward.grpc`, `reward.deadline_s`).
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.token = os.environ.get(TOKEN_ENV) or None
        self.clients = open_clients(config, self.token)
        self.higher = {name: bool(c.info().higher_is_better) for name, c in self.clients.items()}
        self.pool = ThreadPoolExecutor(max_workers=4 * len(self.clients), thread_name_prefix="spie-grpc")
        self.counts = {"grpc.requests": 0, "grpc.retries": 0}
        self._lock = threading.Lock()

    def _count(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def score(self, rollout) -> Scores:
        """Every scorer on the rollout's N edits (images (N, 3, H, W) in [0, 1]), higher is better."""
        edited, sources = rollout.edited_uint8(), rollout.sources_uint8()
        masks = None if rollout.masks is None else list(rollout.masks.cpu().numpy())
        ids = list(rollout.item_ids) or [f"i{i}" for i in range(len(edited))]
        items = [
            make_item(
                ids[i],
                edited[i],
                sources[i],
                rollout.instructions[i],
                None if masks is None else masks[i],
                metadata=None if rollout.metadata is None else rollout.metadata[i],
            )
            for i in range(len(edited))
        ]
        return self.score_items(items)

    def score_items(self, items: list[pb.Item]) -> Scores:
        """N proto Items scored by every scorer; NaN and the reason for an item a server failed."""
        step = self.config.reward.grpc.max_items_per_request
        chunks = [items[i : i + step] for i in range(0, len(items), step)]
        futures = {
            name: [self.pool.submit(self.ask, name, chunk) for chunk in chunks] for name in self.clients
        }
        results = {name: [r for f in parts for r in f.result()] for name, parts in futures.items()}
        return Scores.from_results(results, self.higher)

    def ask(self, name: str, items: list[pb.Item]) -> list[pb.Result]:
        """One Score request to `name`'s server, retried as the module docstring says; N results in
        order."""
        client, r = self.clients[name], self.config.reward
        tries, counted, backoff = 0, 0, 0.05
        window_end = time.monotonic() + r.deadline_s  # UNAVAILABLE is retried until then
        unreachable = False
        while True:
            tries += 1
            self._count("grpc.requests")
            timeout = r.deadline_s if not unreachable else max(0.05, window_end - time.monotonic())
            try:
                response = client.score(items, timeout_s=timeout, scorer=name, wait_for_ready=unreachable)
                results = list(response.results)
            except grpc.RpcError as err:
                left = window_end - time.monotonic()
                gone = unreachable and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                if err.code() == grpc.StatusCode.UNAVAILABLE and left > 0:
                    unreachable = True
                elif err.code() in RETRIED and counted < r.grpc.retries and not gone:
                    counted += 1
                    window_end = time.monotonic() + r.deadline_s
                else:
                    why = "UNAVAILABLE for all of it" if gone else _one_line(err)
                    raise UserError(
                        f"scorer {name!r} at {client.target}: {why} "
                        f"({tries} tries of reward.deadline_s={r.deadline_s:g}s)"
                    ) from err
                self._count("grpc.retries")
                time.sleep(max(0.0, min(backoff, window_end - time.monotonic())))
                backoff = min(1.0, backoff * 2)
                continue
            if [x.id for x in results] != [x.id for x in items]:
                raise UserError(f"scorer {name!r} at {client.target}: the results do not answer the items")
            return results

    def metrics(self) -> dict[str, int]:
        """Requests sent and retried since the last call (`grpc.requests`, `grpc.retries`)."""
        with self._lock:
            out, self.counts = self.counts, {"grpc.requests": 0, "grpc.retries": 0}
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        for c in self.clients.values():
            c.close()
