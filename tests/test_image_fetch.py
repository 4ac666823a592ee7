"""Fetching image URLs: loopback test server, redirects, caps and the private-address guard."""

from __future__ import annotations

import asyncio
import io
from http.server import BaseHTTPRequestHandler

import pytest

from serving.config import ImageLimits
from serving.images import ImageGeometry, fetch_http, load_image
from serving.protocol import APIError
from tests.helpers import loopback_http, random_image


def png_bytes() -> bytes:
    buf = io.BytesIO()
    random_image(24, 16, 9).save(buf, format="PNG")
    return buf.getvalue()


PNG = png_bytes()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        port = self.server.server_address[1]
        if self.path == "/img.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(PNG)))
            self.end_headers()
            self.wfile.write(PNG)
        elif self.path.startswith("/hop/"):
            left = int(self.path.rsplit("/", 1)[1])
            target = "/img.png" if left == 0 else f"/hop/{left - 1}"
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()
        elif self.path == "/to-other-loopback":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.2:{port}/img.png")
            self.end_headers()
        elif self.path == "/big":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the cap must hold while streaming
            self.wfile.write(b"\x89PNG" + b"0" * 100_000)
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def server():
    with loopback_http(Handler) as base:
        yield base


ALLOW_LOOPBACK = ImageLimits(allow_private_urls=["127.0.0.1"], max_image_bytes=50_000)
GEOMETRY = ImageGeometry(patch_size=16, max_image_size=1024)


def fetch(url: str, limits: ImageLimits = ALLOW_LOOPBACK) -> bytes:
    return asyncio.run(fetch_http(url, limits, 0))


def refused(url: str, limits: ImageLimits = ALLOW_LOOPBACK) -> APIError:
    with pytest.raises(APIError) as err:
        fetch(url, limits)
    assert err.value.status == 400
    return err.value


def test_fetch_allow_listed_loopback(server):
    assert fetch(f"{server}/img.png") == PNG
    decoded = asyncio.run(load_image(f"{server}/img.png", ALLOW_LOOPBACK, 0, GEOMETRY))
    assert decoded.size == (24, 16)


def test_redirects_are_followed_and_bounded(server):
    assert fetch(f"{server}/hop/2") == PNG  # three redirects (hop/2, hop/1, hop/0): the default limit
    assert "redirects" in refused(f"{server}/hop/3").message


def test_guard_refuses_private_addresses_by_default(server):
    port = server.rsplit(":", 1)[1]
    for url in (f"{server}/img.png", f"http://localhost:{port}/img.png", "http://169.254.169.254/latest/",
                "http://10.0.0.1/x.png", "http://[::1]/x.png", "http://0.0.0.0/x.png"):
        assert refused(url, ImageLimits()).code == "image_url_forbidden", url


def test_guard_applies_to_every_redirect_hop(server):
    assert refused(f"{server}/to-other-loopback").code == "image_url_forbidden"


def test_byte_cap_while_streaming(server):
    assert refused(f"{server}/big").code == "image_too_large"


def test_http_errors_are_400(server):
    assert refused(f"{server}/missing.png").code == "image_fetch_failed"
    assert refused("http://127.0.0.1:1/x.png").code == "image_fetch_failed"  # nothing listens there


def test_file_urls_only_under_the_configured_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(PNG)
    (tmp_path / "outside.png").write_bytes(PNG)
    limits = ImageLimits(file_root=str(root))
    assert asyncio.run(load_image(f"file://{root}/a.png", limits, 0, GEOMETRY)).size == (24, 16)
    for url in (f"file://{tmp_path}/outside.png", f"file://{root}/../outside.png", f"file://{root}/missing.png"):
        with pytest.raises(APIError):
            asyncio.run(load_image(url, limits, 0, GEOMETRY))


def test_single_frame_gif_webp_jpeg_are_accepted():
    from serving.images import decode_image

    for fmt in ("GIF", "WEBP", "JPEG"):
        buf = io.BytesIO()
        random_image(30, 20, 2).save(buf, format=fmt)
        assert decode_image(buf.getvalue(), ImageLimits(), 0).size == (30, 20)
