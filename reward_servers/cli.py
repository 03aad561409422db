"""`spie serve` (host one scorer over gRPC) and `spie score` (call one from the command line).

    spie serve ssim_structure --port 50051 --device cpu [--config reward_servers/configs/default.yaml]
    spie score --server 127.0.0.1:50051 --images edit.png --sources source.png --instruction "add snow"

The auth token, when used, comes from the SPIE_REWARD_TOKEN environment variable on both sides, so
it never shows up in a process listing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import logging
import math
import os
import signal
import sys
from pathlib import Path

import numpy as np

from reward_servers.errors import UserError

TOKEN_ENV = "SPIE_REWARD_TOKEN"


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="serve one scorer over gRPC")
    serve.add_argument("scorer", help="registered scorer name, e.g. ssim_structure")
    serve.add_argument("--port", type=int, help="port to bind (0: any free port; default 50051)")
    serve.add_argument(
        "--host",
        help="address to bind (default 127.0.0.1); any other address needs SPIE_REWARD_TOKEN set "
        "(or --insecure-no-token)",
    )
    serve.add_argument(
        "--insecure-no-token",
        action="store_true",
        help="allow a non-loopback --host without an auth token (anyone who reaches the port can "
        "use the scorer)",
    )
    serve.add_argument("--device", default="cpu", help="device of model-backed scorers (cpu, cuda:0)")
    serve.add_argument("--config", type=Path, help="YAML with server / batching / scorer sections")
    serve.add_argument("--max-batch-size", type=int, help="override batching.max_batch_size")
    serve.add_argument("--max-queue-delay-ms", type=float, help="override batching.max_queue_delay_ms")
    serve.add_argument("--cache-items", type=int, help="override batching.cache_items (score cache; 0: off)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (0: off)")
    serve.add_argument("--tls-cert", help="PEM certificate (with --tls-key): serve TLS")
    serve.add_argument("--tls-key", help="PEM private key")
    serve.add_argument(
        "--redis-url",
        help="also pull jobs from this Redis (default: queue.url, then REDIS_URL; password in the "
        "URL or REDIS_PASSWORD); without one, gRPC only",
    )
    serve.set_defaults(func=run_serve)

    score = subparsers.add_parser("score", help="score images with a running reward server")
    score.add_argument("--server", required=True, help="HOST:PORT of the reward server")
    score.add_argument("--images", nargs="+", required=True, type=Path, help="edited images")
    score.add_argument("--sources", nargs="+", type=Path, help="source images (default: the edits)")
    score.add_argument("--masks", nargs="+", type=Path, help="edit masks (nonzero: edited region)")
    score.add_argument("--instruction", default="", help="edit instruction, the same for every image")
    score.add_argument("--encoding", choices=("png", "raw"), default="png", help="wire encoding")
    score.add_argument("--timeout", type=float, default=60.0, help="deadline of the call, seconds")
    score.add_argument("--tls-ca", help="PEM CA certificate: connect with TLS")
    score.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per image (with `texts`, a generative judge's reasoning, when given)",
    )
    score.set_defaults(func=run_score)


# ---- serve -----------------------------------------------------------------------------------------


def _scorer_factory(name: str, device: str, kwargs: dict):
    """Check the scorer name now; build the scorer later (on the server's loading thread)."""
    from reward_servers import base

    if name not in base.available_scorers():
        raise UserError(f"unknown scorer {name!r}; known: {', '.join(base.available_scorers())}")
    params = inspect.signature(base._REGISTRY[name]).parameters
    kwargs = dict(kwargs)
    if "device" in params:
        kwargs.setdefault("device", device)
    elif device != "cpu":
        raise UserError(f"scorer {name!r} is weight-free and runs on cpu only, not {device!r}")
    unknown = sorted(k for k in kwargs if k not in params)
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise UserError(f"scorer {name!r} has no option(s) {unknown}; it takes {sorted(params)}")

    def build():
        from reward_servers.hub import check_hub

        check_hub(kwargs, params)  # one question to the hub, not 50 s of retried downloads
        return base.build_scorer(name, **kwargs)

    return build


def _is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace) -> int:
    from reward_servers.config import load_serve_config

    cfg = load_serve_config(args.config)
    server_over = {
        k: v
        for k, v in {
            "host": args.host,
            "port": args.port,
            "metrics_port": args.metrics_port,
            "tls_cert": args.tls_cert,
            "tls_key": args.tls_key,
            "auth_token": os.environ.get(TOKEN_ENV),
        }.items()
        if v is not None
    }
    batch_over = {
        k: v
        for k, v in {
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_ms": args.max_queue_delay_ms,
            "cache_items": args.cache_items,
        }.items()
        if v is not None
    }
    try:
        server_cfg = dataclasses.replace(cfg.server, **server_over)
        batching = dataclasses.replace(cfg.batching, **batch_over)
        queue_url = args.redis_url or cfg.queue.url or os.environ.get("REDIS_URL", "")
        queue_cfg = dataclasses.replace(cfg.queue, url=queue_url) if queue_url else None
    except ValueError as err:
        raise UserError(str(err)) from None
    if not server_cfg.auth_token and not _is_loopback(server_cfg.host) and not args.insecure_no_token:
        raise UserError(
            f"refusing to serve on {server_cfg.host} without an auth token: set {TOKEN_ENV} (clients "
            "send the same), bind 127.0.0.1, or pass --insecure-no-token"
        )
    for name in ("tls_cert", "tls_key"):
        path = getattr(server_cfg, name)
        if path and not Path(path).is_file():
            raise UserError(f"--{name.replace('_', '-')}: no such file {path}")
    factory = _scorer_factory(args.scorer, args.device, cfg.scorer)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return asyncio.run(_serve(args.scorer, factory, server_cfg, batching, args.device, queue_cfg))


async def _serve(name, factory, server_cfg, batching, device, queue_cfg=None) -> int:
    from reward_servers.budget import limit_malloc_arenas
    from reward_servers.server import RewardServer

    limit_malloc_arenas()  # RSS follows the decoded budget (see budget.py)
    server = RewardServer(factory, name, server_cfg, batching, device)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        port = await server.start()
    except OSError as err:
        raise UserError(f"cannot bind {server_cfg.host}:{server_cfg.port}: {err}") from None
    print(f"spie serve: {name} listening on {server_cfg.host}:{port} (loading)", flush=True)
    load = asyncio.ensure_future(server.load())
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({load, waiter}, return_when=asyncio.FIRST_COMPLETED)
    consumer = None
    if load.done():
        if load.exception() is not None:
            await server.stop(grace_s=0)
            raise _load_error(name, load.exception())
        if queue_cfg is not None:
            consumer = await _start_consumer(server, queue_cfg, server_cfg)
        print(f"spie serve: {name} SERVING on {server_cfg.host}:{port}", flush=True)
        await waiter
    print(f"spie serve: {name} draining (grace {server_cfg.drain_grace_s:.0f}s)", flush=True)
    if consumer is not None:
        await consumer.stop(grace_s=server_cfg.drain_grace_s)
    await server.stop()
    if not load.done():
        load.cancel()
    print(f"spie serve: {name} stopped", flush=True)
    return 0


# What a scorer raises when it cannot load for a reason the user fixes: a missing extra (ImportError),
# a missing checkpoint or an unreachable hub (OSError), a bad option (ValueError, TypeError).
_LOAD_ERRORS = (ImportError, OSError, ValueError, TypeError)


def _load_error(name: str, err: BaseException) -> BaseException:
    """A failed load as one line (`UserError`) that names the scorer and the fix the scorer gave;
    an error outside `_LOAD_ERRORS` is a bug and keeps its traceback (the server is stopped either way)."""
    if not isinstance(err, _LOAD_ERRORS):
        return err
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return UserError(f"scorer {name} cannot load: {first}")


async def _start_consumer(server, queue_cfg, server_cfg):
    """Start the Redis stream consumer beside the gRPC server, on the same batcher."""
    import redis

    from reward_servers.queue.consumer import StreamConsumer
    from reward_servers.queue.protocol import describe

    consumer = StreamConsumer(
        server.scorer,
        server.batcher,
        queue_cfg,
        max_pixels=server_cfg.max_pixels,
        max_decoded_bytes=server_cfg.max_decoded_mb * 1024 * 1024,
        decoded_budget=server.decoded_budget,
    )
    try:
        await consumer.start()
    except (redis.RedisError, OSError) as err:
        await server.stop(grace_s=0)
        raise UserError(f"--redis-url {describe(consumer.url)}: {type(err).__name__}: {err}") from None
    print(f"spie serve: {server.scorer_name} consuming {consumer.stream} as {consumer.name}", flush=True)
    return consumer


# ---- score -----------------------------------------------------------------------------------------


def _read_image(path: Path, grey: bool = False) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L" if grey else "RGB"))
    except FileNotFoundError:
        raise UserError(f"no such image: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None


def run_score(args: argparse.Namespace) -> int:
    import grpc

    from protos.spie.reward.v1 import reward_pb2 as pb
    from reward_servers.client import ScorerClient
    from reward_servers.images import make_item

    n = len(args.images)
    for flag in ("sources", "masks"):
        given = getattr(args, flag)
        if given is not None and len(given) != n:
            raise UserError(f"--{flag}: {len(given)} files for {n} --images")
    items = []
    for i, path in enumerate(args.images):
        edited = _read_image(path)
        source = _read_image(args.sources[i]) if args.sources else edited
        mask = _read_image(args.masks[i], grey=True) > 0 if args.masks else None
        items.append(make_item(str(path), edited, source, args.instruction, mask, encoding=args.encoding))
    with ScorerClient(args.server, token=os.environ.get(TOKEN_ENV), tls_ca=args.tls_ca) as client:
        try:
            response = client.score(items, timeout_s=args.timeout)
        except grpc.RpcError as err:
            raise UserError(f"{args.server}: {err.code().name}: {err.details()}") from None
    failed = 0
    for result in response.results:
        ok = result.status == pb.Result.STATUS_OK
        failed += not ok
        if args.json:
            row = {"id": result.id, "score": None if math.isnan(result.score) else result.score}
            row.update(details=dict(result.details), error=result.error or None)
            if result.texts:
                row["texts"] = dict(result.texts)
            print(json.dumps(row))
        elif ok:
            extra = " ".join(f"{k}={v:.6g}" for k, v in sorted(result.details.items()))
            print(f"{result.id}\t{result.score:.6g}\t{extra}".rstrip())
        else:
            print(f"{result.id}\terror\t{result.error}")
    if failed:
        print(f"spie score: {failed} of {n} items failed", file=sys.stderr)
    return 1 if failed else 0
