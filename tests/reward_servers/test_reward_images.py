"""Decoding proto images: round trips, and every kind of bad input raises a named ImageError."""

from __future__ import annotations

import numpy as np
import pytest
from reward_helpers import bad_images

from protos.spie.reward.v1 import reward_pb2 as pb
from reward_servers.images import ImageError, decode_item, decode_mask, decode_rgb, encode_image, make_item


@pytest.mark.parametrize("encoding", ["raw", "png"])
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_round_trip(encoding, channels, rng):
    shape = (17, 23) if channels == 1 else (17, 23, channels)
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    message = pb.Image.FromString(encode_image(array, encoding).SerializeToString())
    rgb = decode_rgb(message, "x")
    assert rgb.shape == (17, 23, 3) and rgb.dtype == np.uint8
    expected = np.repeat(array[:, :, None], 3, 2) if channels == 1 else array[:, :, :3]
    np.testing.assert_array_equal(rgb, expected)


@pytest.mark.parametrize("encoding", ["raw", "png"])
def test_mask_and_item(encoding, image):
    mask = np.zeros((32, 32), bool)
    mask[4:10, 5:20] = True
    item = make_item(
        "i", image(), image(), "x", mask=mask, exemplars=[image(8, 8)], metadata={"k": 1.5}, encoding=encoding
    )
    decoded = decode_item(item, 0)
    np.testing.assert_array_equal(decoded.mask, mask)
    np.testing.assert_array_equal(decode_mask(item.mask, "m"), mask)
    assert decoded.exemplars[0].shape == (8, 8, 3) and decoded.metadata == {"k": 1.5}


@pytest.mark.parametrize("kind", sorted(bad_images(np.random.default_rng(0))))
def test_bad_image_raises_named_error(kind, rng):
    message, fragment = bad_images(rng)[kind]
    with pytest.raises(ImageError) as err:
        decode_rgb(message, "item 3.edited", max_pixels=1 << 24)
    text = str(err.value)
    assert text.startswith("item 3.edited") and fragment in text and "\n" not in text


def test_missing_image_and_mask_size(image):
    item = pb.Item(id="a", edited=encode_image(image()))
    with pytest.raises(ImageError, match=r"item 0 \('a'\)\.source: missing"):
        decode_item(item, 0)
    item = make_item("b", image(), image(), mask=np.zeros((16, 16), bool))
    with pytest.raises(ImageError, match="mask"):
        decode_item(item, 1)
