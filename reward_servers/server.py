"""The gRPC reward server: a thin grpc.aio adapter around one scorer and its dynamic batcher.

The servicer only converts: it decodes the proto items (a bad item gets its own error result),
submits the good ones to the `DynamicBatcher`, and maps failures to status codes:

| failure                                   | status              |
|-------------------------------------------|---------------------|
| request bytes do not parse, no items, too many items, duplicate ids | INVALID_ARGUMENT |
| `scorer` names another scorer             | FAILED_PRECONDITION |
| queue full, or the request's images do not fit the decoded budget (below) | RESOURCE_EXHAUSTED |
| deadline passed in the queue              | DEADLINE_EXCEEDED   |
| not loaded yet, or draining               | UNAVAILABLE         |
| `Ground` on a scorer that does not ground | UNIMPLEMENTED       |
| missing or wrong auth token               | UNAUTHENTICATED     |

Decoded images are bounded per server, not per request: every RPC reserves the bytes its images
decode to (from the headers) from one `DecodedBytesBudget` of `max_decoded_mb` (`decoded_budget`)
before decoding, and gives them back once its items are scored. A request that does not fit waits,
first come first served, until its deadline; one larger than the whole budget is refused at once,
and an item larger than it alone fails alone (INVALID_INPUT).

The standard `grpc.health.v1` service says NOT_SERVING until the scorer is loaded and again while
draining; it needs no token, so load balancers can probe it. Server reflection is on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import logging
import math
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.base import Scorer
from reward_servers.batcher import BatcherClosed, BatcherConfig, DeadlineExpired, DynamicBatcher, QueueFull
from reward_servers.budget import BudgetExceeded, DecodedBytesBudget
from reward_servers.config import ServerConfig
from reward_servers.gradients import score_batch
from reward_servers.grounding_rpc import serve_ground
from reward_servers.images import (
    ImageError,
    clean_error,
    decode_item,
    decode_working_bytes,
    item_decoded_bytes,
    item_images,
    to_batch,
)
from reward_servers.metrics import Metrics
from reward_servers.results import fill_result
from reward_servers.shm import SHARED_DIR_ENV, SharedReader

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RewardService"].full_name
log = logging.getLogger("spie.reward_server")


def _parse_or_none(message_cls):
    """A request deserializer that returns None instead of raising, so the handler can answer
    INVALID_ARGUMENT (grpc's own deserializer failure surfaces as INTERNAL)."""

    def parse(data: bytes):
        try:
            return message_cls.FromString(data)
        except (DecodeError, RuntimeWarning, ValueError):
            return None

    return parse


def _all_raw(request: pb.ScoreRequest) -> bool:
    """True when every image of the request is raw uint8 (decoding it is a copy, not a decompression)."""
    raw = (pb.Image.ENCODING_RAW_UINT8, pb.Image.ENCODING_RAW_UINT8_SHARED)
    for item in request.items:
        if item.edited.encoding not in raw or item.source.encoding not in raw:
            return False
        if (item.HasField("mask") and item.mask.encoding not in raw) or any(
            e.encoding not in raw for e in item.exemplars
        ):
            return False
    return True


class _TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks without `authorization: Bearer <token>`."""

    def __init__(self, token: str, metrics: Metrics) -> None:
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

        async def deny_unary(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")

        async def deny_stream(request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong auth token")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny_unary)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny_stream)

    async def intercept_service(self, continuation, details):
        if details.method.startswith("/grpc.health.v1.Health/"):
            return await continuation(details)
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        sent = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent, self._expected):
            return await continuation(details)
        self._metrics.error("unauthenticated")
        return self._deny_stream if "ServerReflection" in details.method else self._deny_unary


class RewardServer:
    """One scorer behind gRPC.

    Args:
        scorer_factory: builds the scorer (called on a thread by `load`, so loading does not block
            health checks).
        scorer_name: registry name, reported before the scorer is loaded.
        config: network and input limits.
        batching: dynamic batching limits.
        device: the device the scorer runs on (reported by Info).
    """

    def __init__(
        self,
        scorer_factory: Callable[[], Scorer],
        scorer_name: str,
        config: ServerConfig | None = None,
        batching: BatcherConfig | None = None,
        device: str = "cpu",
    ) -> None:
        self.config = config or ServerConfig()
        self.batching = batching or BatcherConfig()
        self.scorer_name = scorer_name
        self.device = device
        self.metrics = Metrics(scorer_name)
        self.scorer: Scorer | None = None
        self.batcher: DynamicBatcher | None = None
        self.port: int | None = None
        self._factory = scorer_factory
        self._draining = False
        self._decode_pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="decode")
        # Decoded images held at once by every RPC (and, when wired, the queue consumer): see budget.py.
        self.decoded_budget = DecodedBytesBudget(self.config.max_decoded_mb * 1024 * 1024)
        self.shared = SharedReader(self.config.shared_dir or os.environ.get(SHARED_DIR_ENV, ""))
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until `load`); return the bound port."""
        limit = self.config.max_message_mb * 1024 * 1024
        interceptors = (
            [_TokenInterceptor(self.config.auth_token, self.metrics)] if self.config.auth_token else []
        )
        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        handlers = {
            "Score": grpc.unary_unary_rpc_method_handler(
                self._score, _parse_or_none(pb.ScoreRequest), pb.ScoreResponse.SerializeToString
            ),
            "Info": grpc.unary_unary_rpc_method_handler(
                self._info, _parse_or_none(pb.InfoRequest), pb.InfoResponse.SerializeToString
            ),
            "Ground": grpc.unary_unary_rpc_method_handler(
                self._ground, _parse_or_none(pb.GroundRequest), pb.GroundResponse.SerializeToString
            ),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())]
            )
            self.port = server.add_secure_port(address, creds)
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise OSError(f"cannot bind {address}")
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self._server = server
        if self.config.metrics_port:
            from prometheus_client import start_http_server

            self._metrics_http, _ = start_http_server(
                self.config.metrics_port, addr=self.config.host, registry=self.metrics.registry
            )
        return self.port

    async def load(self) -> None:
        """Build the scorer on a thread, start the batcher, then report SERVING."""
        scorer = await asyncio.get_running_loop().run_in_executor(None, self._factory)
        size = max(1, min(self.batching.max_batch_size, int(scorer.max_batch_size)))
        if size != self.batching.max_batch_size:
            self.batching = dataclasses.replace(self.batching, max_batch_size=size)
        namespace = f"{scorer.name}/{scorer.version}/{scorer.model_id}"
        self.batcher = DynamicBatcher(
            functools.partial(score_batch, scorer), self.batching, self.metrics, cache_namespace=namespace
        )
        self.batcher.start()
        self.scorer = scorer
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("scorer %s loaded (%s)", scorer.name, scorer.model_id or "weight-free")

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new calls, finish in-flight ones within the grace."""
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        self._draining = True
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.batcher is not None:
            self.batcher.begin_drain()
        if self._server is not None:
            await self._server.stop(grace)
        if self.batcher is not None:
            await self.batcher.close(timeout_s=grace)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)

    # ---- RPCs ------------------------------------------------------------------------------------

    async def _info(self, request, context) -> pb.InfoResponse:
        scorer = self.scorer
        return pb.InfoResponse(
            scorer=self.scorer_name,
            version=scorer.version if scorer else "",
            model_id=scorer.model_id if scorer else "",
            device=self.device,
            higher_is_better=bool(scorer.higher_is_better) if scorer else False,
            max_batch_size=self.batching.max_batch_size,
            max_queue_delay_ms=int(round(self.batching.max_queue_delay_ms)),
            max_queue_size=self.batching.max_queue_size,
            max_message_bytes=self.config.max_message_mb * 1024 * 1024,
            max_pixels=self.config.max_pixels,
            max_items_per_request=self.config.max_items_per_request,
        )

    async def _abort(self, context, code: grpc.StatusCode, kind: str, message: str):
        self.metrics.error(kind)
        await context.abort(code, message)

    def _deadline(self, request: pb.ScoreRequest, context) -> float:
        """Earliest of the call deadline, the request's deadline_unix_ms and the default (monotonic s)."""
        now = time.monotonic()
        candidates = [now + self.config.default_deadline_s]
        remaining = context.time_remaining()
        if remaining is not None:
            candidates.append(now + remaining)
        if request.deadline_unix_ms:
            candidates.append(now + request.deadline_unix_ms / 1000.0 - time.time())
        return min(candidates)

    def _validate(self, request: pb.ScoreRequest | None) -> tuple[grpc.StatusCode, str] | None:
        if request is None:
            return grpc.StatusCode.INVALID_ARGUMENT, "request is not a valid spie.reward.v1.ScoreRequest"
        if request.scorer and request.scorer != self.scorer_name:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"this server hosts scorer {self.scorer_name!r}, request asked for {request.scorer!r}",
            )
        n = len(request.items)
        if n == 0:
            return grpc.StatusCode.INVALID_ARGUMENT, "request has no items"
        if n > self.config.max_items_per_request:
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request has {n} items, limit is {self.config.max_items_per_request}",
            )
        ids = [item.id for item in request.items if item.id]
        if len(set(ids)) != len(ids):
            return grpc.StatusCode.INVALID_ARGUMENT, "item ids must be unique within a request"
        return None

    def _decode_all(self, request: pb.ScoreRequest, costs: list[int]) -> list:
        """Decode every item (decode thread); a bad item's ImageError stays in its slot, and so does
        one whose images alone decode to more than the whole budget (`costs`, from the headers)."""
        out = []
        for index, item in enumerate(request.items):
            where = f"item {index} ({item.id!r})" if item.id else f"item {index}"
            if costs[index] > self.decoded_budget.limit:
                out.append(
                    ImageError(
                        f"{where}: its images decode to {costs[index] / 2**20:.0f} MiB, over the "
                        f"server's budget of {self.config.max_decoded_mb} MiB (server.max_decoded_mb)"
                    )
                )
                continue
            try:
                out.append(decode_item(item, index, self.config.max_pixels, self.shared))
            except ImageError as err:
                out.append(err)
            except Exception as err:  # anything else about one item fails that item alone
                out.append(ImageError(f"{where}: {type(err).__name__}: {clean_error(err)}"))
        return out

    async def _ground(self, request: pb.GroundRequest | None, context) -> pb.GroundResponse:
        return await serve_ground(self, request, context)

    async def _score(self, request: pb.ScoreRequest | None, context) -> pb.ScoreResponse:
        start = time.perf_counter()
        if self.batcher is None or self._draining:
            state = "draining" if self._draining else "loading"
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, "unavailable", f"scorer is {state}")
        problem = self._validate(request)
        if problem is not None:
            kind = "invalid_request" if problem[0] == grpc.StatusCode.INVALID_ARGUMENT else "wrong_scorer"
            await self._abort(context, problem[0], kind, problem[1])
        deadline = self._deadline(request, context)
        costs = [item_decoded_bytes(item) for item in request.items]  # from the headers
        limit = self.decoded_budget.limit
        total = sum(c for c in costs if c <= limit)
        # Decoding also needs scratch space (one PNG at a time): held until decoding ends.
        working = decode_working_bytes([im for item in request.items for im in item_images(item)])
        working = min(working, max(0, limit - total))
        try:
            await self.decoded_budget.acquire(total + working, deadline)
        except BudgetExceeded as err:
            await self._abort(
                context, grpc.StatusCode.RESOURCE_EXHAUSTED, "decoded_budget", f"request refused: {err}"
            )
        try:
            response = await self._score_held(request, context, costs, deadline, working)
        finally:  # the decoded images are gone with _score_held's frame (which gave `working` back)
            self.decoded_budget.release(total)
        self.metrics.latency.observe(time.perf_counter() - start)
        return response

    async def _score_held(self, request, context, costs: list[int], deadline: float, working: int):
        """Decode, score and answer `request`, its decoded bytes (and `working` bytes of decoding
        scratch, given back once decoded) reserved by the caller."""
        try:
            if _all_raw(request):
                # Raw pixels decode without decompressing (a view of the bytes): no thread hop for it.
                decoded = self._decode_all(request, costs)
            else:
                loop = asyncio.get_running_loop()
                decoded = await loop.run_in_executor(self._decode_pool, self._decode_all, request, costs)
        finally:
            self.decoded_budget.release(working)
        good = [i for i, d in enumerate(decoded) if not isinstance(d, ImageError)]
        self.metrics.error("invalid_input", len(decoded) - len(good))
        outcomes = {}
        if good:
            try:
                results = await self.batcher.submit(to_batch([decoded[i] for i in good]), deadline)
            except QueueFull as err:
                await self._abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full", str(err))
            except DeadlineExpired as err:
                await self._abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline", str(err))
            except BatcherClosed as err:
                await self._abort(context, grpc.StatusCode.UNAVAILABLE, "unavailable", str(err))
            outcomes = dict(zip(good, results, strict=True))
        response = pb.ScoreResponse(scorer=self.scorer_name, version=self.scorer.version)
        for index, item in enumerate(request.items):
            result = response.results.add(id=item.id)
            if index in outcomes:
                fill_result(result, outcomes[index])
            else:
                result.score, result.status = math.nan, pb.Result.STATUS_INVALID_INPUT
                result.error = str(decoded[index])
        return response
