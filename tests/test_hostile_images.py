"""Hostile images and image URLs: every one is a 400 (or accepted when legitimate), quickly and
within bounded memory, and never an exception of another kind."""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import os
import random
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler

import pytest
from PIL import BmpImagePlugin, Image

from serving.config import ImageLimits
from serving.images import ImageGeometry, decode_data_url, fetch_http, load_image, load_images, prepare_image
from serving.protocol import APIError
from tests.helpers import loopback_http, random_image

GEOMETRY = ImageGeometry(patch_size=16, max_image_size=1024)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def two_frames(fmt: str) -> bytes:
    first, second = random_image(30, 20, 1), random_image(30, 20, 2)
    return encoded(first, fmt, save_all=True, append_images=[second])


PNG = encoded(random_image(24, 16, 9), "PNG")
DRIP_CLOSED = threading.Event()  # the slow handler saw its client go away


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path in ("/gzip", "/gzip-layered"):
            body = gzip.compress(b"\0" * (8 << 20))  # 8 MiB of zeros in a few KB
            encoding = "gzip"
            if self.path == "/gzip-layered":
                body, encoding = gzip.compress(body), "gzip, gzip"
            self.send_response(200)
            self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/drip":  # one byte every 0.2 s, for a minute
            self.send_response(200)
            self.send_header("Content-Length", "300")
            self.end_headers()
            try:
                for _ in range(300):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                DRIP_CLOSED.set()
        elif self.path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def server():
    with loopback_http(Handler) as base:
        yield base


LOOPBACK = ImageLimits(allow_private_urls=["127.0.0.1"], fetch_timeout_s=1.0)


def refusal(coro) -> APIError:
    with pytest.raises(APIError) as err:
        asyncio.run(coro)
    assert err.value.status == 400, err.value.message
    return err.value


# -- HTTP fetches --------------------------------------------------------------------------

def test_encoded_responses_are_refused_not_expanded(server):
    for path in ("/gzip", "/gzip-layered"):
        error = refusal(fetch_http(f"{server}{path}", LOOPBACK, 0))
        assert error.code == "image_fetch_failed" and "Content-Encoding" in error.message, error.message


def test_slow_drip_hits_the_whole_fetch_deadline(server):
    started = time.monotonic()
    error = refusal(fetch_http(f"{server}/drip", LOOPBACK, 0))
    assert error.code == "image_fetch_timeout" and time.monotonic() - started < 3


def test_one_failed_image_cancels_its_siblings(server):
    DRIP_CLOSED.clear()
    limits = ImageLimits(allow_private_urls=["127.0.0.1"], fetch_timeout_s=30)
    started = time.monotonic()
    error = refusal(load_images([f"{server}/drip", "data:image/png;base64,!!"], limits, GEOMETRY))
    assert error.code == "invalid_image_url" and time.monotonic() - started < 2
    assert DRIP_CLOSED.wait(5), "the slow sibling fetch kept running after the request failed"


def test_request_images_share_one_deadline(server):
    limits = ImageLimits(allow_private_urls=["127.0.0.1"], fetch_timeout_s=30, request_images_timeout_s=1.0)
    started = time.monotonic()
    error = refusal(load_images([f"{server}/img.png", f"{server}/drip", f"{server}/drip"], limits, GEOMETRY))
    assert error.code == "image_fetch_timeout" and time.monotonic() - started < 3


@pytest.mark.parametrize("url", [
    "http://example.com:99999/x.png", "http://example.com:port/x.png", "http://[::1/x.png", "http://[zz::1]/x",
    "http://exa mple.com/x.png", "http://a..b/x.png", "http://" + "a" * 300 + ".com/x.png", "http:///x.png",
    "https://\udcff.example/x.png", "http://example.com\x00.evil/x.png",
])
def test_malformed_urls_are_400(url):
    assert refusal(fetch_http(url, ImageLimits(fetch_timeout_s=5), 0)).code in (
        "invalid_image_url", "image_fetch_failed", "image_url_forbidden")


# -- files ---------------------------------------------------------------------------------

def test_file_urls_refuse_fifos_directories_nul_oversize_and_escapes(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.png").write_bytes(PNG)
    (root / "big.png").write_bytes(PNG + b"\0" * 5000)
    os.mkfifo(root / "fifo.png")  # opening it for reading would wait for a writer forever
    (root / "dir.png").mkdir()
    (tmp_path / "secret.png").write_bytes(PNG)
    os.symlink(tmp_path / "secret.png", root / "link.png")
    limits = ImageLimits(file_root=str(root), max_image_bytes=len(PNG) + 100)
    assert asyncio.run(load_image(f"file://{root}/ok.png", limits, 0, GEOMETRY)).size == (24, 16)
    assert asyncio.run(load_image(f"file://{root}/o%6B.png", limits, 0, GEOMETRY)).size == (24, 16)
    started = time.monotonic()
    for name in ("fifo.png", "dir.png", "big.png", "ok.png%00.txt", "link.png", "..%2Fsecret.png"):
        refusal(asyncio.wait_for(load_image(f"file://{root}/{name}", limits, 0, GEOMETRY), 5))
    assert time.monotonic() - started < 5


# -- data: URLs (RFC 2397) -----------------------------------------------------------------

def test_data_urls_in_every_rfc_2397_spelling():
    b64 = base64.b64encode(PNG).decode()
    wrapped = "\r\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))
    spellings = [f"data:image/png;base64,{b64}", f"data:image/png;BASE64,{b64}", f"data:;Base64,{b64}",
                 f"data:image/png;base64,{wrapped}", f"data:image/png;name=x.png;base64,{b64}",
                 f"data:image/png;base64,{b64.replace('+', '%2B').replace('/', '%2F')}"]
    for url in spellings:
        assert decode_data_url(url, 0) == PNG, url[:40]
    raw = "data:image/png," + "".join(f"%{b:02X}" for b in PNG)  # percent-encoded bytes, no base64
    assert decode_data_url(raw, 0) == PNG
    for bad in ("data:image/png;base64", "data:image/png;base64,***", "data:image/png;base64,iVBORw0KGgo="):
        with pytest.raises(APIError):
            prepare_image(decode_data_url(bad, 0), ImageLimits(), 0, GEOMETRY)


# -- decoding ------------------------------------------------------------------------------

def test_mpo_phone_photos_give_their_first_picture():
    first, second = random_image(40, 30, 3), random_image(40, 30, 4)
    mpo = encoded(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    prepared = prepare_image(mpo, ImageLimits(), 0, GEOMETRY)
    alone = prepare_image(encoded(first, "JPEG"), ImageLimits(), 0, GEOMETRY)
    assert prepared.size == (40, 30) and (prepared.payload.pixels == alone.payload.pixels).all()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF"])
def test_animations_are_refused(fmt):
    with pytest.raises(APIError, match="animated") as err:
        prepare_image(two_frames(fmt), ImageLimits(), 0, GEOMETRY)
    assert err.value.code == "unsupported_image_format"


def test_other_formats_never_reach_their_pillow_decoders(monkeypatch):
    def must_not_open(self):
        raise AssertionError("the BMP plugin parsed request bytes")

    monkeypatch.setattr(BmpImagePlugin.BmpImageFile, "_open", must_not_open)
    for fmt in ("BMP", "TIFF", "ICO", "PPM", "TGA", "PCX", "QOI"):
        with pytest.raises(APIError) as err:
            prepare_image(encoded(random_image(16, 16, 5), fmt), ImageLimits(), 0, GEOMETRY)
        assert err.value.code == "unsupported_image_format", fmt
    for text in (b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"%PDF-1.7\n"):
        with pytest.raises(APIError):
            prepare_image(text, ImageLimits(), 0, GEOMETRY)


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and header for a huge image, then one tiny compressed row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_declared_size_is_checked_before_any_pixel_is_decoded():
    for w, h in ((60_000, 60_000), (6_000, 5_000), (1_000_000, 30)):
        started = time.monotonic()
        with pytest.raises(APIError) as err:
            prepare_image(png_claiming(w, h), ImageLimits(), 0, GEOMETRY)
        assert err.value.code == "image_too_large" and time.monotonic() - started < 0.5, (w, h)


# -- a seeded mutation fuzzer over image bytes ----------------------------------------------

ACCEPTED = {"PNG": encoded(random_image(33, 21, 6), "PNG"), "JPEG": encoded(random_image(33, 21, 7), "JPEG"),
            "MPO": encoded(random_image(33, 21, 8), "MPO", save_all=True, append_images=[random_image(33, 21, 9)]),
            "WEBP": encoded(random_image(33, 21, 10), "WEBP"), "GIF": encoded(random_image(33, 21, 11), "GIF"),
            "RGBA PNG": encoded(random_image(33, 21, 12).convert("RGBA"), "PNG"),
            "palette PNG": encoded(random_image(33, 21, 13).convert("P"), "PNG")}
REFUSED = {"APNG": two_frames("PNG"), "animated WEBP": two_frames("WEBP"), "animated GIF": two_frames("GIF"),
           "BMP": encoded(random_image(33, 21, 14), "BMP"), "TIFF": encoded(random_image(33, 21, 15), "TIFF"),
           "ICO": encoded(random_image(32, 32, 16), "ICO"), "huge PNG": png_claiming(50_000, 50_000)}


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        at = rng.randrange(len(out)) if out else 0
        if kind == 0 and out:  # flip bits
            out[at] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:  # overwrite with an interesting value
            out[at] = rng.choice([0, 1, 0x7F, 0x80, 0xFF])
        elif kind == 2:  # truncate
            out = out[:at]
        elif kind == 3:  # insert random bytes
            out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:  # duplicate a slice (repeated chunks and markers)
            end = min(len(out), at + rng.randint(1, 64))
            out[at:at] = out[at:end]
    return bytes(out)


@pytest.mark.parametrize("name", [*ACCEPTED, *REFUSED])
def test_mutated_image_bytes_give_an_image_or_a_400(name):
    original = {**ACCEPTED, **REFUSED}[name]
    rng = random.Random(f"image-fuzz-{name}")  # seeded: a failure replays exactly
    limits = ImageLimits(max_image_pixels=4_000_000)
    outcomes = {"image": 0, "400": 0}
    for i in range(60):
        data = mutate(original, rng)
        started = time.monotonic()
        try:
            prepared = prepare_image(data, limits, 0, GEOMETRY)
            assert prepared.size[0] * prepared.size[1] <= limits.max_image_pixels
            outcomes["image"] += 1
        except APIError as exc:
            assert exc.status == 400 and exc.code in (
                "invalid_image", "unsupported_image_format", "image_too_large"), (name, i, exc.code)
            outcomes["400"] += 1
        assert time.monotonic() - started < 2, (name, i)
    assert sum(outcomes.values()) == 60
