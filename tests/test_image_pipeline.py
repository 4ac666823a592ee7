"""The ingress + vision-pool image path equals mistral-common's preprocessing exactly."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from serving.config import ImageLimits
from serving.images import decode_image
from serving.protocol import APIError
from serving.vision_encoder_server import payload_pixels
from tests.helpers import encode_chat, random_image


def encoded(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def rgba_image(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")


@pytest.mark.parametrize("size", [(1, 1), (70, 40), (2000, 1000), (3000, 10), (1024, 1024), (4000, 3000)])
def test_pixels_equal_mistral_common(size, mistral_12b):
    img = random_image(*size, seed=11)
    decoded = decode_image(encoded(img), ImageLimits(max_image_bytes=64 << 20), 0)  # noise compresses badly
    payload = decoded.payload(16, 1024)
    _, ref = encode_chat(mistral_12b, ["x", Image.open(io.BytesIO(encoded(img)))])
    ours = payload_pixels(payload, torch.device("cpu"))
    assert torch.equal(ours, ref[0]), (size, (ours - ref[0]).abs().max())
    if size == (4000, 3000):  # uint8 would outweigh resized float32: shipped resized
        assert payload.pixels.dtype == np.float32
    else:
        assert payload.pixels.dtype == np.uint8 and payload.nbytes == size[0] * size[1] * 3


def test_transparency_and_palette_equal_mistral_common(mistral_12b):
    for img in (rgba_image(33, 47), random_image(40, 40, 3).convert("P"), random_image(30, 20, 4).convert("L")):
        data = encoded(img)
        ours = payload_pixels(decode_image(data, ImageLimits(), 0).payload(16, 1024), torch.device("cpu"))
        _, ref = encode_chat(mistral_12b, ["x", Image.open(io.BytesIO(data))])
        assert torch.equal(ours, ref[0]), img.mode


def test_pixel_cap_and_byte_cap():
    with pytest.raises(APIError, match="pixels"):
        decode_image(encoded(random_image(300, 300, 0)), ImageLimits(max_image_pixels=80_000), 0)
    with pytest.raises(APIError, match="bytes"):
        decode_image(encoded(random_image(300, 300, 0)), ImageLimits(max_image_bytes=1000), 0)


def test_decompression_bomb_is_refused_before_decoding():
    bomb = encoded(Image.new("L", (20000, 20000)))  # a few KB of PNG, 400M pixels
    assert len(bomb) < 1_000_000
    with pytest.raises(APIError) as err:
        decode_image(bomb, ImageLimits(), 0)
    assert err.value.status == 400
