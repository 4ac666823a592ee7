"""The vision-encoder pool: a Serve deployment of replicated ViTs that batches images across requests.

Input: uint8 RGB (or already-resized float32) pixels. Output: pre-adapter patch features, which
are 5-12x smaller than post-adapter ones; the decoder applies the adapter.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque

import torch
from ray import serve

from model.engine.local_executor import is_device_fatal
from model.engine.model_runner import ImageFeatures
from model.image_processing import normalize, resize
from model.loader import load_vision_encoder
from serving.config import AppConfig
from serving.health import start_heap_trimmer
from serving.logs import setup_logging
from serving.images import ImagePayload
from serving.metrics import metric

log = logging.getLogger("pixtral_serve.vision")


class ImageEncodeError(RuntimeError):
    """One image could not be encoded (its batch mates were). Not a replica failure: never retried."""


def payload_pixels(payload: ImagePayload, device: torch.device) -> torch.Tensor:
    """The normalised (3, h, w) model input; uint8 originals are resized here, as mistral-common would."""
    pixels = payload.pixels
    if pixels.dtype != "float32":
        pixels = resize(pixels, payload.target_size)
    return normalize(torch.from_numpy(pixels).to(device))


class EncoderCache:
    """LRU of encoder outputs by image content hash, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries: OrderedDict[str, ImageFeatures] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str) -> ImageFeatures | None:
        found = self.entries.get(key)
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return found

    def put(self, key: str, value: ImageFeatures) -> None:
        size = value.features.numel() * value.features.element_size()
        if size > self.max_bytes or key in self.entries:
            return
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.features.numel() * old.features.element_size()


def patch_budget_slices(sizes: list[int], budget: int) -> list[tuple[int, int]]:
    """Split a batch, in order, into (lo, hi) slices of at most `budget` patches; an image over the
    budget gets a slice of its own."""
    slices, lo, total = [], 0, 0
    for i, n in enumerate(sizes):
        if i > lo and total + n > budget:
            slices.append((lo, i))
            lo, total = i, 0
        total += n
    if sizes:
        slices.append((lo, len(sizes)))
    return slices


@serve.deployment(name="VisionEncoder")
class VisionEncoderServer:
    def __init__(self, config: dict) -> None:
        setup_logging()
        cfg = AppConfig.from_dict(config)
        self.tags = {"model": cfg.served_model_name}
        self.device = torch.device("cuda" if cfg.device == "cuda" else "cpu")
        if self.device.type == "cuda" and 0 < cfg.vision.num_gpus < 1:
            # A replica sharing a GPU (with a decoder rank, by default) stays within its share: past
            # it, this replica's allocation fails, which it survives (`_encode_now` retries an image
            # at a time), rather than the decoder's.
            torch.cuda.set_per_process_memory_fraction(cfg.vision.num_gpus)
        self.encoder = load_vision_encoder(cfg.model, device=self.device, dtype=getattr(torch, cfg.dtype),
                                           tokenizer=cfg.tokenizer)
        self.cache = EncoderCache(cfg.vision.cache_bytes)
        self._encode_batch.set_max_batch_size(cfg.vision.max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(cfg.vision.batch_wait_timeout_s)
        self.max_batch_patches = cfg.vision.max_batch_patches
        self.recent_batch_sizes: deque[int] = deque(maxlen=256)  # bounded: a replica runs for weeks
        self.error: BaseException | None = None
        start_heap_trimmer()

    async def encode(self, payload: ImagePayload) -> ImageFeatures:
        cached = self.cache.get(payload.content_hash)
        metric("pixtral_vision_cache_hits_total" if cached else "pixtral_vision_cache_misses_total").inc(tags=self.tags)
        if cached is not None:
            return cached
        features = await self._encode_batch(payload)
        if isinstance(features, Exception):
            raise features  # this image's own failure; its batch mates got their features
        self.cache.put(payload.content_hash, features)
        return features

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, payloads: list[ImagePayload]) -> list[ImageFeatures | ImageEncodeError]:
        self.recent_batch_sizes.append(len(payloads))
        start = time.perf_counter()
        features = await asyncio.to_thread(self._encode_now, payloads)
        metric("pixtral_vision_encode_latency_seconds").observe(time.perf_counter() - start, tags=self.tags)
        metric("pixtral_vision_batch_size").observe(len(payloads), tags=self.tags)
        return features

    def _encode_now(self, payloads: list[ImagePayload]) -> list[ImageFeatures | ImageEncodeError]:
        """Encode a batch; if it raises, encode its images one at a time, so that an image that
        cannot be encoded fails alone (as an ImageEncodeError in its place) and the rest succeed."""
        try:
            return self._encode_together(payloads)
        except Exception as exc:  # noqa: BLE001 - find whose it is
            if is_device_fatal(exc):
                self.error = exc  # the device is gone: fail the health check, get replaced
                raise
            if len(payloads) == 1:
                log.warning("an image failed to encode: %s", type(exc).__name__)
                return [ImageEncodeError(f"the image could not be encoded ({type(exc).__name__})")]
            log.warning("a batch of %d images failed (%s); encoding them one at a time", len(payloads),
                        type(exc).__name__)
        # out of the handler first: its traceback holds the failed forward's tensors, which an
        # out-of-memory retry needs back
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return [result for p in payloads for result in self._encode_now([p])]

    @torch.inference_mode()
    def _encode_together(self, payloads: list[ImagePayload]) -> list[ImageFeatures]:
        results = []
        patch = self.encoder.args.patch_size
        sizes = [(p.target_size[0] // patch) * (p.target_size[1] // patch) for p in payloads]
        for lo, hi in patch_budget_slices(sizes, self.max_batch_patches):
            # one forward per slice; images in it never attend to each other
            features, grids = self.encoder([payload_pixels(p, self.device) for p in payloads[lo:hi]])
            parts = features.split([h * w for h, w in grids])
            results += [ImageFeatures(part.cpu(), grid) for part, grid in zip(parts, grids)]
        return results

    def stats(self) -> dict:
        import ray

        return {"cache_hits": self.cache.hits, "cache_misses": self.cache.misses, "recent_batch_sizes": list(self.recent_batch_sizes),
                "node_id": ray.get_runtime_context().get_node_id(),
                "replica": serve.get_replica_context().replica_id.unique_id}  # as the affinity ring names it

    def check_health(self) -> None:
        if self.error is not None:  # a live replica with its weights loaded is healthy, unless its device failed
            raise RuntimeError(f"the vision encoder's device failed: {self.error!r}")
