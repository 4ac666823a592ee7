"""Getting images safely: data/http(s)/file URLs -> validated, decoded RGB pixels for the vision pool.

Every refusal is an APIError with a clear message (400, or 413 for too many images), never a 500.
Remote fetches refuse loopback, private, link-local, multicast, reserved and cloud-metadata
addresses unless allow-listed: every redirect hop is checked, and the connection goes to the very
address that was checked (no second DNS lookup an attacker could rebind).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import os
import socket
from dataclasses import dataclass
from io import BytesIO
from urllib.parse import urljoin, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.image_processing import resize, token_grid
from serving.config import ImageLimits
from serving.protocol import APIError, bad_request

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP", "GIF"}
Image.MAX_IMAGE_PIXELS = None  # we enforce our own cap before decoding pixels


@dataclass
class ImagePayload:
    """What travels from the ingress to a vision replica: uint8 RGB, or float32 already resized when
    the original is so large that its uint8 pixels outweigh the resized float32 ones."""

    pixels: np.ndarray  # uint8 (H, W, 3) original, or float32 (h, w, 3) resized
    target_size: tuple[int, int]  # (w, h) in pixels, whole patches
    content_hash: str

    @property
    def nbytes(self) -> int:
        return self.pixels.nbytes


@dataclass
class DecodedImage:
    rgb: np.ndarray  # uint8 (H, W, 3)
    content_hash: str

    @property
    def size(self) -> tuple[int, int]:
        return self.rgb.shape[1], self.rgb.shape[0]

    def payload(self, patch_size: int, max_image_size: int, merge: int = 1) -> ImagePayload:
        nw, nh = token_grid(*self.size, patch_size, max_image_size, merge)
        step = patch_size * merge
        target = (nw * step, nh * step)
        if self.rgb.nbytes > target[0] * target[1] * 3 * 4:
            return ImagePayload(resize(self.rgb, target), target, self.content_hash)
        return ImagePayload(self.rgb, target, self.content_hash)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited over white (mistral-common's rule)."""
    if image.mode == "RGB":
        return image
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    canvas = Image.new("RGBA", image.size, "WHITE")
    canvas.paste(image, (0, 0), image)
    return canvas.convert("RGB")


def decode_image(data: bytes, limits: ImageLimits, index: int) -> DecodedImage:
    where = f"image {index}"
    if len(data) > limits.max_image_bytes:
        raise bad_request(f"{where} is {len(data)} bytes; the limit is {limits.max_image_bytes}", code="image_too_large")
    try:
        image = Image.open(BytesIO(data))
        fmt = image.format
        if fmt not in ALLOWED_FORMATS:
            raise bad_request(f"{where} is {fmt or 'of an unknown format'}; supported: PNG, JPEG, WEBP, GIF",
                              code="unsupported_image_format")
        w, h = image.size
        if w * h > limits.max_image_pixels:
            raise bad_request(f"{where} has {w}x{h} pixels; the limit is {limits.max_image_pixels} pixels",
                              code="image_too_large")
        if getattr(image, "n_frames", 1) > 1:
            raise bad_request(f"{where} is an animated {fmt} ({image.n_frames} frames); send a single frame",
                              code="unsupported_image_format")
        image.load()
        rgb = np.asarray(to_rgb(image), dtype=np.uint8)
    except APIError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise bad_request(f"{where} could not be decoded as an image: {type(exc).__name__}",
                          code="invalid_image") from None
    return DecodedImage(np.ascontiguousarray(rgb), hashlib.sha256(data).hexdigest())


def decode_data_url(url: str, index: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise bad_request(f"image {index}: a data URL must look like data:image/png;base64,...", code="invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"image {index}: the data URL is not valid base64", code="invalid_image_url") from None


def read_file_url(url: str, limits: ImageLimits, index: int) -> bytes:
    if not limits.file_root:
        raise bad_request(f"image {index}: file:// URLs are disabled on this server", code="invalid_image_url")
    root = os.path.realpath(limits.file_root)
    path = os.path.realpath(urlsplit(url).path)
    if os.path.commonpath([root, path]) != root:
        raise bad_request(f"image {index}: file:// URLs must point inside the configured image directory",
                          code="invalid_image_url")
    try:
        size = os.path.getsize(path)
        if size > limits.max_image_bytes:
            raise bad_request(f"image {index} is {size} bytes; the limit is {limits.max_image_bytes}", code="image_too_large")
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        raise bad_request(f"image {index}: no readable file at that file:// URL", code="invalid_image_url") from None


def _address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str, limits: ImageLimits) -> bool:
    for entry in limits.allow_private_urls:
        if entry == host:
            return True
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
                                 or ip.is_reserved or ip.is_unspecified)


async def resolve_checked(host: str, port: int, limits: ImageLimits, index: int) -> str:
    """Resolve a hostname once; refuse it if any address is not public (or allow-listed)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise bad_request(f"image {index}: cannot resolve host {host!r}", code="image_fetch_failed") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses or not all(_address_allowed(a, host, limits) for a in addresses):
        raise bad_request(f"image {index}: the URL points to a private, loopback, link-local or metadata address",
                          code="image_url_forbidden")
    return str(addresses[0])


async def fetch_http(url: str, limits: ImageLimits, index: int) -> bytes:
    import httpx

    async with httpx.AsyncClient(timeout=limits.fetch_timeout_s, follow_redirects=False, trust_env=False) as client:
        for _ in range(limits.max_redirects + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise bad_request(f"image {index}: unsupported URL {url[:80]!r}", code="invalid_image_url")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            ip = await resolve_checked(parts.hostname, port, limits, index)
            host_ip = f"[{ip}]" if ":" in ip else ip
            pinned = parts._replace(netloc=f"{host_ip}:{port}").geturl()
            headers = {"Host": parts.netloc.rsplit("@", 1)[-1], "Accept": "image/*"}
            try:
                async with client.stream("GET", pinned, headers=headers,
                                         extensions={"sni_hostname": parts.hostname}) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise bad_request(f"image {index}: fetching the URL returned HTTP {response.status_code}",
                                          code="image_fetch_failed")
                    return await _read_capped(response, limits, index)
            except httpx.HTTPError as exc:
                raise bad_request(f"image {index}: fetching the URL failed ({type(exc).__name__})",
                                  code="image_fetch_failed") from None
        raise bad_request(f"image {index}: more than {limits.max_redirects} redirects", code="image_fetch_failed")


async def _read_capped(response, limits: ImageLimits, index: int) -> bytes:
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
        raise bad_request(f"image {index} is {declared} bytes; the limit is {limits.max_image_bytes}", code="image_too_large")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limits.max_image_bytes:
            raise bad_request(f"image {index} exceeds {limits.max_image_bytes} bytes", code="image_too_large")
    return bytes(body)


async def load_image(url: str, limits: ImageLimits, index: int) -> DecodedImage:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = decode_data_url(url, index)
    elif scheme in ("http", "https"):
        data = await fetch_http(url, limits, index)
    elif scheme == "file":
        data = read_file_url(url, limits, index)
    else:
        raise bad_request(f"image {index}: unsupported URL scheme {scheme or url[:16]!r}; use data:, http(s): or file:",
                          code="invalid_image_url")
    # decoding is CPU work: keep the event loop free for other requests
    return await asyncio.to_thread(decode_image, data, limits, index)


def too_many_images(count: int, limits: ImageLimits) -> APIError:
    return APIError(413, f"the request has {count} images; at most {limits.max_images} are allowed",
                    "invalid_request_error", "messages", "too_many_images")
