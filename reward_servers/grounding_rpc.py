"""The `Ground` RPC: the server side (a thin adapter around a scorer's `ground(images, phrases)`) and
the helpers a client needs to build requests and read masks back.

Failures map as for `Score`: a malformed request (no items, too many, duplicate ids) is
INVALID_ARGUMENT; a server whose scorer cannot ground answers UNIMPLEMENTED; a bad image or a phrase
found nowhere fails its item alone (STATUS_INVALID_INPUT). The images reserve their decoded bytes
from the server's one `decoded_budget`, as Score's do (RESOURCE_EXHAUSTED when they cannot fit). The model runs on the scorer's worker
thread, between scoring batches, in chunks of at most `max_batch_size` images.
"""

from __future__ import annotations

import asyncio
import math

import grpc
import numpy as np

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.batcher import BatcherClosed, DeadlineExpired
from reward_servers.budget import BudgetExceeded
from reward_servers.images import (
    ImageError,
    clean_error,
    decode_mask,
    decode_rgb,
    encode_image,
    image_decoded_bytes,
)


def make_ground_item(item_id: str, image: np.ndarray, phrase: str, encoding: str = "raw") -> pb.GroundItem:
    """A proto GroundItem from an (H, W, 3) uint8 image and the phrase to find."""
    return pb.GroundItem(id=item_id, image=encode_image(image, encoding), phrase=phrase)


def result_mask(result: pb.GroundResult) -> np.ndarray | None:
    """The (H, W) bool mask of an OK result (None otherwise)."""
    if result.status != pb.Result.STATUS_OK:
        return None
    return decode_mask(result.mask, f"result {result.id!r}.mask")


def _problem(server, request: pb.GroundRequest | None) -> str | None:
    if request is None:
        return "request is not a valid spie.reward.v1.GroundRequest"
    if not request.items:
        return "request has no items"
    if len(request.items) > server.config.max_items_per_request:
        return f"request has {len(request.items)} items, limit is {server.config.max_items_per_request}"
    ids = [item.id for item in request.items if item.id]
    if len(set(ids)) != len(ids):
        return "item ids must be unique within a request"
    return None


def _decode(request: pb.GroundRequest, max_pixels: int, costs: list[int], limit: int) -> list:
    out: list[np.ndarray | ImageError] = []
    for index, item in enumerate(request.items):
        where = f"item {index} ({item.id!r})" if item.id else f"item {index}"
        try:
            if not item.HasField("image"):
                raise ImageError(f"{where}.image: missing")
            if costs[index] > limit:
                raise ImageError(
                    f"{where}.image: decodes to {costs[index] / 2**20:.0f} MiB, over the server's budget of "
                    f"{limit / 2**20:.0f} MiB (server.max_decoded_mb)"
                )
            if not item.phrase.strip():
                raise ImageError(f"{where}.phrase: empty")
            out.append(decode_rgb(item.image, f"{where}.image", max_pixels))
        except ImageError as err:
            out.append(err)
        except Exception as err:  # anything else about one item fails that item alone
            out.append(ImageError(f"{where}: {type(err).__name__}: {clean_error(err)}"))
    return out


async def serve_ground(server, request: pb.GroundRequest | None, context) -> pb.GroundResponse:
    """Answer one Ground call for `server` (a `RewardServer`)."""
    if server.batcher is None or server._draining:
        state = "draining" if server._draining else "loading"
        await server._abort(context, grpc.StatusCode.UNAVAILABLE, "unavailable", f"scorer is {state}")
    problem = _problem(server, request)
    if problem is not None:
        await server._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "invalid_request", problem)
    ground = getattr(server.scorer, "ground", None)
    if ground is None:
        await server._abort(
            context,
            grpc.StatusCode.UNIMPLEMENTED,
            "unimplemented",
            f"scorer {server.scorer_name!r} does not ground phrases; serve `grounding` for masks",
        )
    deadline = server._deadline(request, context)
    budget = server.decoded_budget  # shared with Score: see reward_servers/budget.py
    costs = [image_decoded_bytes(item.image) if item.HasField("image") else 0 for item in request.items]
    total = sum(c for c in costs if c <= budget.limit)
    try:
        await budget.acquire(total, deadline)
    except BudgetExceeded as err:
        await server._abort(
            context, grpc.StatusCode.RESOURCE_EXHAUSTED, "decoded_budget", f"request refused: {err}"
        )
    try:
        return await _ground_held(server, request, context, ground, costs, deadline)
    finally:  # the decoded images are gone with _ground_held's frame
        budget.release(total)


async def _ground_held(
    server, request, context, ground, costs: list[int], deadline: float
) -> pb.GroundResponse:
    loop = asyncio.get_running_loop()
    limit = server.decoded_budget.limit
    decoded = await loop.run_in_executor(
        server._decode_pool, _decode, request, server.config.max_pixels, costs, limit
    )
    good = [i for i, d in enumerate(decoded) if not isinstance(d, ImageError)]
    server.metrics.error("invalid_input", len(decoded) - len(good))
    found = {}
    size = server.batching.max_batch_size
    try:
        for start in range(0, len(good), size):
            chunk = good[start : start + size]
            images, phrases = [decoded[i] for i in chunk], [request.items[i].phrase for i in chunk]
            found.update(
                zip(
                    chunk,
                    await server.batcher.run_exclusive(ground, images, phrases, deadline=deadline),
                    strict=True,
                )
            )
    except DeadlineExpired as err:
        await server._abort(context, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline", str(err))
    except BatcherClosed as err:
        await server._abort(context, grpc.StatusCode.UNAVAILABLE, "unavailable", str(err))
    response = pb.GroundResponse(grounder=server.scorer_name, version=server.scorer.version)
    for index, item in enumerate(request.items):
        result = response.results.add(id=item.id)
        if index not in found:
            result.status, result.error, result.box_score = (
                pb.Result.STATUS_INVALID_INPUT,
                str(decoded[index]),
                math.nan,
            )
            continue
        g = found[index]
        result.box_score = g.score
        if g.error is not None:
            result.status, result.error = pb.Result.STATUS_INVALID_INPUT, g.error
            continue
        result.status = pb.Result.STATUS_OK
        result.mask.CopyFrom(encode_image(g.mask, "png"))
        result.box.extend(g.box)
    return response
