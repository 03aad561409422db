"""Convert between `reward.proto` messages and the numpy arrays a `Scorer` takes.

Decoding is defensive: every failure raises `ImageError` with a one-line message naming the field,
so a transport can report it on that item and score the rest of the batch. A pixel cap is checked
against the header (PNG) or the stated size (raw) before any pixel is decompressed, so a small
request cannot expand into gigabytes (a decompression bomb).

Images decode to (H, W, 3) uint8 RGB; masks decode to (H, W) bool, True inside the edit region.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format
from PIL import Image as PILImage

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.base import ScoreBatch

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DEFAULT_MAX_PIXELS = 4096 * 4096
# Decoded bytes one request (or one queue read) may expand to, checked from the headers first.
DEFAULT_MAX_DECODED_MB = 512
_ADDRESS = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>|0x[0-9a-fA-F]{6,}")


class ImageError(ValueError):
    """A bad image in one item: undecodable, truncated, empty, mis-sized or over the pixel cap."""


def clean_error(err: BaseException) -> str:
    """`err` as one line without object reprs or memory addresses (messages go back to clients)."""
    text = " ".join(str(err).split())
    return _ADDRESS.sub("<data>", text)


def encode_image(array: np.ndarray, encoding: str = "raw", compress_level: int = 1) -> pb.Image:
    """Encode an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 (or bool mask) array as a proto Image.

    Args:
        array: pixels; a bool array is stored as 0/255 grey.
        encoding: "raw" (uint8 bytes with the shape) or "png".
        compress_level: zlib level for PNG (1 is fast; 9 is small).
    """
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ValueError(f"encode_image: expected uint8 or bool pixels, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"encode_image: expected (H, W[, 1|3|4]) pixels, got shape {array.shape}")
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    if encoding == "raw":
        return pb.Image(
            encoding=pb.Image.ENCODING_RAW_UINT8,
            data=np.ascontiguousarray(array).tobytes(),
            width=width,
            height=height,
            channels=channels,
        )
    if encoding == "png":
        buffer = io.BytesIO()
        PILImage.fromarray(array).save(buffer, format="PNG", compress_level=compress_level)
        return pb.Image(
            encoding=pb.Image.ENCODING_PNG,
            data=buffer.getvalue(),
            width=width,
            height=height,
            channels=channels,
        )
    raise ValueError(f"encode_image: unknown encoding {encoding!r} (use 'raw' or 'png')")


def _check_size(field: str, width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{field}: zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(f"{field}: {width}x{height} exceeds the pixel cap of {max_pixels}")


def decode_pixels(
    image: pb.Image, field: str, max_pixels: int = DEFAULT_MAX_PIXELS, shared=None
) -> np.ndarray:
    """Decode a proto Image to (H, W, C) uint8 with C in {1, 3, 4}, checking sizes and the pixel cap.
    `shared`: the server's `shm.SharedReader`, for images sent through shared memory (read in place)."""
    if image.encoding in (pb.Image.ENCODING_RAW_UINT8, pb.Image.ENCODING_RAW_UINT8_SHARED):
        w, h, c = image.width, image.height, image.channels
        _check_size(field, w, h, max_pixels)
        if c not in (1, 3, 4):
            raise ImageError(f"{field}: raw image has {c} channels (expected 1, 3 or 4)")
        if image.encoding == pb.Image.ENCODING_RAW_UINT8_SHARED:
            if shared is None:
                raise ImageError(f"{field}: sent through shared memory, which this transport does not read")
            return shared.pixels(image.data, w * h * c, field).reshape(h, w, c)
        if len(image.data) != w * h * c:
            raise ImageError(
                f"{field}: raw image states {w}x{h}x{c} = {w * h * c} bytes but carries {len(image.data)}"
            )
        return np.frombuffer(image.data, dtype=np.uint8).reshape(h, w, c)
    if image.encoding == pb.Image.ENCODING_PNG:
        if not image.data:
            raise ImageError(f"{field}: empty PNG data")
        if not image.data.startswith(PNG_SIGNATURE):
            raise ImageError(f"{field}: data is not a PNG file (bad signature)")
        try:
            pil = PILImage.open(io.BytesIO(image.data), formats=["PNG"])
            w, h = pil.size  # read from the header only
            _check_size(field, w, h, max_pixels)
            pil.load()
        except ImageError:
            raise
        except PILImage.DecompressionBombError as err:
            raise ImageError(f"{field}: exceeds the pixel cap ({clean_error(err)})") from None
        except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, zlib.error...
            raise ImageError(f"{field}: undecodable PNG ({type(err).__name__}: {clean_error(err)})") from None
        if (image.width and image.width != w) or (image.height and image.height != h):
            raise ImageError(f"{field}: states {image.width}x{image.height} but the PNG is {w}x{h}")
        if pil.mode not in ("L", "RGB", "RGBA"):
            pil = pil.convert("RGBA" if "A" in pil.getbands() else "RGB")
        array = np.asarray(pil)
        return array[:, :, None] if array.ndim == 2 else array
    raise ImageError(f"{field}: unsupported encoding {image.encoding} (use PNG or RAW_UINT8)")


def decode_rgb(image: pb.Image, field: str, max_pixels: int = DEFAULT_MAX_PIXELS, shared=None) -> np.ndarray:
    """Decode to (H, W, 3) uint8 RGB: grey is repeated, alpha is dropped."""
    pixels = decode_pixels(image, field, max_pixels, shared)
    if pixels.shape[2] == 1:
        return np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


def decode_mask(image: pb.Image, field: str, max_pixels: int = DEFAULT_MAX_PIXELS, shared=None) -> np.ndarray:
    """Decode a mask to (H, W) bool: True where any channel is nonzero."""
    return decode_pixels(image, field, max_pixels, shared).any(axis=2)


@dataclass
class DecodedItem:
    """One proto Item as arrays: what a `ScoreBatch` holds for one index."""

    id: str
    edited: np.ndarray
    source: np.ndarray
    instruction: str
    mask: np.ndarray | None
    exemplars: list[np.ndarray]
    metadata: dict[str, Any]
    tensor: np.ndarray | None = None  # (3, H, W) float32 edit before quantisation, or None
    want_gradient: bool = False


def decode_item(item: pb.Item, index: int, max_pixels: int = DEFAULT_MAX_PIXELS, shared=None) -> DecodedItem:
    """Decode one proto Item; raises `ImageError` naming the item and field on any bad input.
    `shared`: see `decode_pixels`."""
    where = f"item {index} ({item.id!r})" if item.id else f"item {index}"
    for name in ("edited", "source"):
        if not item.HasField(name):
            raise ImageError(f"{where}.{name}: missing")
    edited = decode_rgb(item.edited, f"{where}.edited", max_pixels, shared)
    source = decode_rgb(item.source, f"{where}.source", max_pixels, shared)
    mask = None
    if item.HasField("mask"):
        mask = decode_mask(item.mask, f"{where}.mask", max_pixels, shared)
        if mask.shape != edited.shape[:2]:
            raise ImageError(f"{where}.mask: {mask.shape[1]}x{mask.shape[0]} does not match the edit")
    exemplars = [
        decode_rgb(ex, f"{where}.exemplars[{k}]", max_pixels, shared) for k, ex in enumerate(item.exemplars)
    ]
    metadata = decode_metadata(item, where)
    tensor = None
    if item.HasField("edited_tensor"):
        from reward_servers.gradients import TensorError, decode_tensor

        try:
            tensor = decode_tensor(item.edited_tensor, f"{where}.edited_tensor", max_pixels * 3)
        except TensorError as err:
            raise ImageError(str(err)) from None
        if tensor.shape != (3, *edited.shape[:2]):
            raise ImageError(
                f"{where}.edited_tensor: shape {list(tensor.shape)} is not (3, height, width) of the edit "
                f"{list(edited.shape[:2])}"
            )
        low, high = (float(tensor.min()), float(tensor.max())) if tensor.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high)) or low < 0.0 or high > 1.0:
            raise ImageError(
                f"{where}.edited_tensor: values span [{low:g}, {high:g}], outside the image range [0, 1] "
                "(send the edit as floats in [0, 1], not NaN or infinite)"
            )
    return DecodedItem(
        item.id, edited, source, item.instruction, mask, exemplars, metadata, tensor, item.want_gradient
    )


def decode_metadata(item: pb.Item, where: str) -> dict[str, Any]:
    """The item's metadata Struct as a dict; NaN, infinities or anything else JSON cannot hold raise
    `ImageError` for this item alone."""
    if not item.HasField("metadata"):
        return {}
    try:
        return json_format.MessageToDict(item.metadata)
    except Exception as err:  # protobuf raises ValueError for NaN / inf, and others for odd values
        raise ImageError(f"{where}.metadata: {clean_error(err)}") from None


def _stated_size(image: pb.Image) -> tuple[int, int]:
    """(width, height) from the PNG header or the raw image's fields; (0, 0) when unreadable."""
    if image.encoding in (pb.Image.ENCODING_RAW_UINT8, pb.Image.ENCODING_RAW_UINT8_SHARED):
        return max(0, image.width), max(0, image.height)
    if image.encoding == pb.Image.ENCODING_PNG and image.data.startswith(PNG_SIGNATURE):
        try:
            with PILImage.open(io.BytesIO(image.data), formats=["PNG"]) as pil:
                return pil.size  # the header only
        except Exception:
            return 0, 0
    return 0, 0


def image_decoded_bytes(image: pb.Image, rgb: bool = True) -> int:
    """Bytes `image` decodes to, from its header (PNG) or stated size (raw), without decoding it:
    width x height x 3 for an RGB image (edited, source, exemplars), width x height for a mask.
    Unreadable headers cost 0 here: decoding rejects them on its own. Python ints: no overflow."""
    w, h = _stated_size(image)
    return w * h * (3 if rgb else 1)


# Bytes per pixel PIL holds while a PNG decodes, beside the result: its own buffer in the PNG's
# mode (up to 4), the RGB(A) conversion (4) and the bytes numpy reads them from (up to 4), less the
# 3 of the result, rounded up.
PNG_WORKING_BYTES_PER_PIXEL = 8


def decode_working_bytes(images: list[pb.Image]) -> int:
    """Scratch bytes decoding `images` one after another needs beside the results: the working set of
    the largest PNG (raw images decode from the request's own bytes)."""
    sizes = [_stated_size(im) for im in images if im.encoding == pb.Image.ENCODING_PNG]
    return max((w * h * PNG_WORKING_BYTES_PER_PIXEL for w, h in sizes), default=0)


def item_images(item: pb.Item) -> list[pb.Image]:
    """Every image of an item: edited, source, mask, exemplars (those it has)."""
    fields = [getattr(item, f) for f in ("edited", "source", "mask") if item.HasField(f)]
    return fields + list(item.exemplars)


def item_decoded_bytes(item: pb.Item) -> int:
    """Bytes the item's images decode to (edited, source, mask, every exemplar), from the headers."""
    total = sum(image_decoded_bytes(getattr(item, f), True) for f in ("edited", "source") if item.HasField(f))
    if item.HasField("mask"):
        total += image_decoded_bytes(item.mask, False)
    if item.HasField("edited_tensor"):
        # float32 once decoded; math.prod of Python ints (np.prod wrapped [2^31, 2^31, 2] to < 0)
        total += 4 * math.prod(int(d) for d in item.edited_tensor.shape)
    return total + sum(image_decoded_bytes(ex, True) for ex in item.exemplars)


def to_batch(items: list[DecodedItem]) -> ScoreBatch:
    """Stack decoded items into one `ScoreBatch` (lists, so sizes may differ between items)."""
    return ScoreBatch(
        edited=[it.edited for it in items],
        sources=[it.source for it in items],
        instructions=[it.instruction for it in items],
        masks=[it.mask for it in items],
        exemplars=[it.exemplars for it in items],
        metadata=[it.metadata for it in items],
        tensors=[it.tensor for it in items],
        want_gradient=[it.want_gradient for it in items],
    )


def make_item(
    item_id: str,
    edited: np.ndarray,
    source: np.ndarray,
    instruction: str = "",
    mask: np.ndarray | None = None,
    exemplars: list[np.ndarray] | None = None,
    metadata: dict[str, Any] | None = None,
    encoding: str = "raw",
    tensor: np.ndarray | None = None,
    want_gradient: bool = False,
) -> pb.Item:
    """Build a proto Item from arrays (the client side of `decode_item`); `tensor` is the (3, H, W)
    float edit sent with a gradient request (`want_gradient`)."""
    item = pb.Item(
        id=item_id,
        edited=encode_image(edited, encoding),
        source=encode_image(source, encoding),
        instruction=instruction,
        exemplars=[encode_image(ex, encoding) for ex in exemplars or []],
    )
    if mask is not None:
        item.mask.CopyFrom(encode_image(mask, encoding))
    if metadata:
        item.metadata.update(metadata)
    if tensor is not None:
        from reward_servers.gradients import encode_tensor

        item.edited_tensor.CopyFrom(encode_tensor(tensor))
    item.want_gradient = want_gradient
    return item
