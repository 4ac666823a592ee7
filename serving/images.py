"""Getting images safely: data/http(s)/file URLs -> validated, decoded RGB pixels for the vision pool.

Every refusal is an APIError with a clear message (400, or 413 for too many images), never a 500.
Remote fetches refuse loopback, private, link-local, multicast, reserved and cloud-metadata
addresses unless allow-listed: every redirect hop is checked, and the connection goes to the very
address that was checked (no second DNS lookup an attacker could rebind). A fetch asks for an
unencoded body, never decompresses one, and has one deadline for the whole of it (DNS, redirects,
body); a request's images share a deadline too, and one failing cancels the others.

Only the decoders of the accepted formats ever see the bytes, and the declared size is checked
before any pixel is decoded (Pillow's own bomb guard stays on behind it). All CPU and file work
(base64, file reads, decoding, resizing) runs in a small thread pool, off the event loop and
bounded in how many images it holds decoded at once; what a request keeps is the payload for the
vision pool, never larger than the resized float32 image.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import os
import re
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from urllib.parse import unquote, unquote_to_bytes, urljoin, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.image_processing import resize, token_grid
from serving.config import ImageLimits
from serving.protocol import APIError, bad_request

# The Pillow plugins allowed to parse request bytes. JPEG's also opens MPO (a JPEG with more
# pictures, as phones save them), of which we take the first.
OPENERS = ["PNG", "JPEG", "WEBP", "GIF"]
MULTI_PICTURE = "MPO"
# Pillow's decompression-bomb guard (Image.MAX_IMAGE_PIXELS, 89M) stays on behind our own cap.
# At most this many images are decoded at once per ingress process: their full-size pixels are
# the largest transient memory an ingress holds.
IMAGE_WORKERS = 2
_image_pool = ThreadPoolExecutor(IMAGE_WORKERS, thread_name_prefix="image")


async def off_loop(fn, *args):
    """Run CPU or file work in the image pool, keeping the event loop free."""
    return await asyncio.get_running_loop().run_in_executor(_image_pool, fn, *args)


@dataclass(frozen=True)
class ImageGeometry:
    """How the model cuts images into patches (from the checkpoint), to size the payload."""

    patch_size: int
    max_image_size: int
    merge: int = 1


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

    @property
    def affinity_key(self) -> str:
        """The vision pool routes an image to the replica whose cache likely holds it."""
        return self.content_hash


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


@dataclass
class PreparedImage:
    """What a request keeps of an image: its size (for tokenization) and the vision payload."""

    size: tuple[int, int]  # (width, height) of the original
    content_hash: str
    payload: ImagePayload


def decode_image(data: bytes, limits: ImageLimits, index: int) -> DecodedImage:
    where = f"image {index}"
    if len(data) > limits.max_image_bytes:
        raise bad_request(f"{where} is {len(data)} bytes; the limit is {limits.max_image_bytes}", code="image_too_large")
    try:
        image = Image.open(BytesIO(data), formats=OPENERS)  # reads the header only
        fmt = image.format
        w, h = image.size
        if w * h > limits.max_image_pixels:
            raise bad_request(f"{where} has {w}x{h} pixels; the limit is {limits.max_image_pixels} pixels",
                              code="image_too_large")
        if fmt != MULTI_PICTURE and getattr(image, "is_animated", False):
            raise bad_request(f"{where} is an animated {fmt}; send a single frame", code="unsupported_image_format")
        image.load()  # an MPO's first picture
        rgb = np.asarray(to_rgb(image), dtype=np.uint8)
    except APIError:
        raise
    except UnidentifiedImageError:
        raise bad_request(f"{where} is not a PNG, JPEG, WEBP or GIF image", code="unsupported_image_format") from None
    except Image.DecompressionBombError:  # Pillow's own guard, behind ours
        raise bad_request(f"{where} declares too many pixels; the limit is {limits.max_image_pixels}",
                          code="image_too_large") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many kinds on malformed bytes (fuzzed)
        raise bad_request(f"{where} could not be decoded as an image: {type(exc).__name__}",
                          code="invalid_image") from None
    return DecodedImage(np.ascontiguousarray(rgb), hashlib.sha256(data).hexdigest())


def prepare_image(data: bytes, limits: ImageLimits, index: int, geometry: ImageGeometry) -> PreparedImage:
    """Decode and size the payload; the full-size pixels are dropped before this returns."""
    decoded = decode_image(data, limits, index)
    payload = decoded.payload(geometry.patch_size, geometry.max_image_size, geometry.merge)
    return PreparedImage(decoded.size, decoded.content_hash, payload)


_BASE64_TOKEN = re.compile(r";base64$", re.IGNORECASE)
_WHITESPACE = re.compile(rb"\s+")


def decode_data_url(url: str, index: int) -> bytes:
    """RFC 2397: data:[<mediatype>][;base64],<data>. `;base64` in any case; whitespace inside
    base64 (line-wrapped payloads) is ignored; without it the data is percent-encoded bytes."""
    header, sep, payload = url[len("data:"):].partition(",")
    if not sep:
        raise bad_request(f"image {index}: a data URL must look like data:image/png;base64,...", code="invalid_image_url")
    raw = unquote_to_bytes(payload) if "%" in payload else payload.encode("utf-8", "surrogatepass")
    if not _BASE64_TOKEN.search(header):
        return raw
    try:
        return base64.b64decode(_WHITESPACE.sub(b"", raw), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"image {index}: the data URL is not valid base64", code="invalid_image_url") from None


def read_file_url(url: str, limits: ImageLimits, index: int) -> bytes:
    """A regular file under the configured root, at most max_image_bytes (blocking: run it off the loop)."""
    if not limits.file_root:
        raise bad_request(f"image {index}: file:// URLs are disabled on this server", code="invalid_image_url")
    unreadable = bad_request(f"image {index}: no readable image file at that file:// URL", code="invalid_image_url")
    path = unquote(urlsplit(url).path)
    if "\x00" in path:
        raise unreadable
    root = os.path.realpath(limits.file_root)
    path = os.path.realpath(path)
    if os.path.commonpath([root, path]) != root:
        raise bad_request(f"image {index}: file:// URLs must point inside the configured image directory",
                          code="invalid_image_url")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; then only regular files are read
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except (OSError, ValueError):
        raise unreadable from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise bad_request(f"image {index}: file:// URLs must name a regular file", code="invalid_image_url")
        if info.st_size > limits.max_image_bytes:
            raise bad_request(f"image {index} is {info.st_size} bytes; the limit is {limits.max_image_bytes}",
                              code="image_too_large")
        with os.fdopen(fd, "rb") as f:
            fd = None  # the file object closes it now
            data = f.read(limits.max_image_bytes + 1)  # the file may grow after the check
    except OSError:
        raise unreadable from None
    finally:
        if fd is not None:
            os.close(fd)
    if len(data) > limits.max_image_bytes:
        raise bad_request(f"image {index} exceeds {limits.max_image_bytes} bytes", code="image_too_large")
    return data


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
    except (socket.gaierror, UnicodeError, ValueError):  # unknown host, or not a valid name at all
        raise bad_request(f"image {index}: cannot resolve host {host[:80]!r}", code="image_fetch_failed") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
    if not addresses or not all(_address_allowed(a, host, limits) for a in addresses):
        raise bad_request(f"image {index}: the URL points to a private, loopback, link-local or metadata address",
                          code="image_url_forbidden")
    return str(addresses[0])


def _http_target(url: str, index: int) -> tuple[str, str, int, str]:
    """(scheme, host, port, netloc) of an http(s) URL, or a 400 naming what is wrong with it."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname
    except ValueError:  # a bad port or a malformed IPv6 literal
        raise bad_request(f"image {index}: malformed URL {url[:80]!r}", code="invalid_image_url") from None
    if parts.scheme not in ("http", "https") or not host:
        raise bad_request(f"image {index}: unsupported URL {url[:80]!r}", code="invalid_image_url")
    return parts.scheme, host, port, parts.netloc.rsplit("@", 1)[-1]


async def fetch_http(url: str, limits: ImageLimits, index: int) -> bytes:
    """The body of an http(s) image URL, all of it within limits.fetch_timeout_s."""
    try:
        return await asyncio.wait_for(_fetch_http(url, limits, index), limits.fetch_timeout_s)
    except (TimeoutError, asyncio.TimeoutError):  # the same class from Python 3.11
        raise bad_request(f"image {index}: fetching the URL took over {limits.fetch_timeout_s:g}s",
                          code="image_fetch_timeout") from None


async def _fetch_http(url: str, limits: ImageLimits, index: int) -> bytes:
    import httpx

    async with httpx.AsyncClient(timeout=limits.fetch_timeout_s, follow_redirects=False, trust_env=False) as client:
        for _ in range(limits.max_redirects + 1):
            scheme, host, port, netloc = _http_target(url, index)
            ip = await resolve_checked(host, port, limits, index)
            host_ip = f"[{ip}]" if ":" in ip else ip
            pinned = urlsplit(url)._replace(scheme=scheme, netloc=f"{host_ip}:{port}").geturl()
            headers = {"Host": netloc, "Accept": "image/*", "Accept-Encoding": "identity"}
            try:
                async with client.stream("GET", pinned, headers=headers,
                                         extensions={"sni_hostname": host}) as response:
                    if response.is_redirect:
                        url = urljoin(url, response.headers.get("location", ""))
                        continue
                    if response.status_code != 200:
                        raise bad_request(f"image {index}: fetching the URL returned HTTP {response.status_code}",
                                          code="image_fetch_failed")
                    return await _read_capped(response, limits, index)
            except (httpx.HTTPError, httpx.InvalidURL, ValueError, UnicodeError) as exc:
                raise bad_request(f"image {index}: fetching the URL failed ({type(exc).__name__})",
                                  code="image_fetch_failed") from None
        raise bad_request(f"image {index}: more than {limits.max_redirects} redirects", code="image_fetch_failed")


async def _read_capped(response, limits: ImageLimits, index: int) -> bytes:
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # we asked for identity; decompressing would let a small body expand without bound
        raise bad_request(f"image {index}: the server sent a body with Content-Encoding {encoding[:40]!r}; "
                          "images must be served unencoded", code="image_fetch_failed")
    declared = response.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
        raise bad_request(f"image {index} is {declared} bytes; the limit is {limits.max_image_bytes}", code="image_too_large")
    body = bytearray()
    async for chunk in response.aiter_raw():  # the bytes as sent: never decoded by the client
        body += chunk
        if len(body) > limits.max_image_bytes:
            raise bad_request(f"image {index} exceeds {limits.max_image_bytes} bytes", code="image_too_large")
    return bytes(body)


async def load_image(url: str, limits: ImageLimits, index: int, geometry: ImageGeometry) -> PreparedImage:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        data = await off_loop(decode_data_url, url, index)
    elif scheme in ("http", "https"):
        data = await fetch_http(url, limits, index)
    elif scheme == "file":
        data = await off_loop(read_file_url, url, limits, index)
    else:
        raise bad_request(f"image {index}: unsupported URL scheme {scheme[:16] or url[:16]!r}; use data:, http(s): "
                          "or file:", code="invalid_image_url")
    return await off_loop(prepare_image, data, limits, index, geometry)


async def load_images(urls: list[str], limits: ImageLimits, geometry: ImageGeometry) -> list[PreparedImage]:
    """All of a request's images within limits.request_images_timeout_s; the first failure cancels the rest."""
    tasks = [asyncio.ensure_future(load_image(u, limits, i, geometry)) for i, u in enumerate(urls)]
    if not tasks:
        return []
    try:
        done, pending = await asyncio.wait(tasks, timeout=limits.request_images_timeout_s,
                                           return_when=asyncio.FIRST_EXCEPTION)
        errors = [t.exception() for t in tasks if t in done and t.exception() is not None]
        if errors:
            raise errors[0]
        if pending:
            raise bad_request(f"the request's images took over {limits.request_images_timeout_s:g}s to fetch and "
                              "decode", code="image_fetch_timeout")
        return [t.result() for t in tasks]
    finally:
        for task in tasks:
            task.cancel()


def too_many_images(count: int, limits: ImageLimits) -> APIError:
    return APIError(413, f"the request has {count} images; at most {limits.max_images} are allowed",
                    "invalid_request_error", "messages", "too_many_images")
