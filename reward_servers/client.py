"""A small synchronous client of one reward server (used by `spie score`, tests and benchmarks).

with ScorerClient("127.0.0.1:50051") as client:
    client.wait_ready(timeout_s=60)
    response = client.score([make_item("a", edit, source, "make it snowy")])
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.server import SERVICE_NAME
from reward_servers.shm import SharedRegions


class ScorerClient:
    """Blocking client of `spie.reward.v1.RewardService`.

    Args:
        target: "host:port".
        token: auth token sent as `authorization: Bearer <token>` (None: none).
        tls_ca: PEM file of the CA that signed the server's certificate (None: plaintext).
        timeout_s: default deadline of each call, in seconds.
        max_message_mb: largest message sent or received, in MiB.
        shared_dir: a server on this machine: send raw pixels through shared-memory regions in
            this folder (the server's `server.shared_dir`; reward_servers/shm.py), not the socket.
    """

    def __init__(
        self,
        target: str,
        token: str | None = None,
        tls_ca: str | Path | None = None,
        timeout_s: float = 60.0,
        max_message_mb: int = 64,
        shared_dir: str | Path = "",
    ) -> None:
        self.regions = SharedRegions(shared_dir) if shared_dir else None
        limit = max_message_mb * 1024 * 1024
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # Reconnect to a restarted server within a second (gRPC's default backoff grows to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if tls_ca is not None:
            creds = grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())
            self.channel = grpc.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.target = target
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._score = self.channel.unary_unary(
            f"/{SERVICE_NAME}/Score",
            request_serializer=pb.ScoreRequest.SerializeToString,
            response_deserializer=pb.ScoreResponse.FromString,
        )
        self._info = self.channel.unary_unary(
            f"/{SERVICE_NAME}/Info",
            request_serializer=pb.InfoRequest.SerializeToString,
            response_deserializer=pb.InfoResponse.FromString,
        )
        self._ground = self.channel.unary_unary(
            f"/{SERVICE_NAME}/Ground",
            request_serializer=pb.GroundRequest.SerializeToString,
            response_deserializer=pb.GroundResponse.FromString,
        )
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def score(
        self,
        items: list[pb.Item],
        timeout_s: float | None = None,
        scorer: str = "",
        wait_for_ready: bool = False,
    ) -> pb.ScoreResponse:
        """Score items in one request; raises grpc.RpcError on a request-level failure. With
        `wait_for_ready`, an unreachable server is waited for until the deadline (not UNAVAILABLE)."""
        request = pb.ScoreRequest(items=items, scorer=scorer)
        return self.score_request(request, timeout_s, wait_for_ready)

    def score_request(
        self, request: pb.ScoreRequest, timeout_s: float | None = None, wait_for_ready: bool = False
    ) -> pb.ScoreResponse:
        region, request = self._shared(request)
        try:
            return self._score(
                request,
                timeout=timeout_s or self.timeout_s,
                metadata=self._metadata,
                wait_for_ready=wait_for_ready,
            )
        finally:
            if region is not None:
                self.regions.release(region)

    def score_future(self, request: pb.ScoreRequest, timeout_s: float | None = None) -> grpc.Future:
        """Send a request without waiting; `.result()` gives the ScoreResponse or raises grpc.RpcError."""
        region, request = self._shared(request)
        future = self._score.future(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)
        if region is not None:
            future.add_done_callback(lambda _: self.regions.release(region))
        return future

    def _shared(self, request: pb.ScoreRequest):
        """(region, request): with `shared_dir`, the request's raw pixels moved into a region, held
        until the response is in; else (None, request)."""
        if self.regions is None:
            return None, request
        region, items = self.regions.pack(list(request.items))
        if region is None:
            return None, request
        moved = pb.ScoreRequest(scorer=request.scorer, deadline_unix_ms=request.deadline_unix_ms)
        moved.items.extend(items)
        return region, moved

    def ground(self, items: list[pb.GroundItem], timeout_s: float | None = None) -> pb.GroundResponse:
        """Masks of each item's phrase (a server hosting `grounding`); see `grounding_rpc.result_mask`."""
        request = pb.GroundRequest(items=items)
        return self._ground(request, timeout=timeout_s or self.timeout_s, metadata=self._metadata)

    def info(self, timeout_s: float | None = None) -> pb.InfoResponse:
        return self._info(pb.InfoRequest(), timeout=timeout_s or self.timeout_s, metadata=self._metadata)

    def health(self, timeout_s: float = 5.0) -> int:
        """The server's health status (a `health_pb2.HealthCheckResponse` enum value)."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        return self._health.Check(request, timeout=timeout_s).status

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Block until health reports SERVING; raise TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status = self.health(timeout_s=min(5.0, max(0.1, deadline - time.monotonic())))
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as err:
                last = f"{err.code().name}: {err.details()}"
            time.sleep(0.05)
        raise TimeoutError(f"reward server {self.target} not SERVING after {timeout_s:.0f}s ({last})")

    def close(self) -> None:
        self.channel.close()
        if self.regions is not None:
            self.regions.close()

    def __enter__(self) -> ScorerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
