"""Turning a read of queue jobs into decoded items: parse each payload, split the read into parts
whose images decode within the replica's byte budget (checked from the headers first), decode each
item on its own so that a bad one fails alone."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.images import (
    ImageError,
    clean_error,
    decode_item,
    decode_working_bytes,
    item_decoded_bytes,
    item_images,
)


def parse_all(blobs: list) -> list:
    """Each blob as a `pb.Item`, or an ImageError for one that is not (or for an error in its place:
    a blob reference that could not be read)."""
    out = []
    for blob in blobs:
        if isinstance(blob, Exception):
            out.append(ImageError(str(blob)))
            continue
        try:
            out.append(pb.Item.FromString(blob))
        except (DecodeError, ValueError) as err:
            out.append(ImageError(f"item payload is not a spie.reward.v1.Item: {clean_error(err)}"))
    return out


def decode_all(items: list, max_pixels: int) -> list:
    """Each item decoded, or an ImageError naming it: a bad item fails alone."""
    out = []
    for item in items:
        if isinstance(item, Exception):
            out.append(item)
            continue
        try:
            out.append(decode_item(item, 0, max_pixels))
        except Exception as err:  # ImageError, or anything else about this item: it fails alone
            text = str(err) if isinstance(err, ImageError) else f"{type(err).__name__}: {clean_error(err)}"
            bad = ImageError(text.replace("item 0", f"item {item.id!r}", 1))
            bad.item_id = item.id
            out.append(bad)
    return out


def part_decoded_bytes(items: list) -> int:
    """What decoding a part's items holds at most: their decoded images plus the scratch of the largest
    PNG (from the headers; items that already failed parsing count 0)."""
    ok = [it for it in items if not isinstance(it, Exception)]
    return sum(map(item_decoded_bytes, ok)) + decode_working_bytes(
        [im for it in ok for im in item_images(it)]
    )


def split_parts(pairs: list, max_decoded_bytes: int) -> list[list]:
    """Split (job, item) pairs into runs whose decoded images fit `max_decoded_bytes`."""
    parts, current, used = [], [], 0
    for job, item in pairs:
        cost = 0 if isinstance(item, Exception) else item_decoded_bytes(item)
        if cost > max_decoded_bytes:
            bad = ImageError(
                f"item {item.id!r}: its images decode to {cost / 2**20:.0f} MiB, over the replica's "
                f"budget of {max_decoded_bytes / 2**20:.0f} MiB (server.max_decoded_mb)"
            )
            bad.item_id = item.id
            item, cost = bad, 0
        if current and used + cost > max_decoded_bytes:
            parts.append(current)
            current, used = [], 0
        current.append((job, item))
        used += cost
    if current:
        parts.append(current)
    return parts
