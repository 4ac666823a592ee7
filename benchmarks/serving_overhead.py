"""What the serving path costs, measured side by side in one run.

    python -m benchmarks.serving_overhead [--requests 40] [--images 24]

1. Latency: the same short greedy request (8 output tokens) sent in turn to
     engine   the AsyncEngine called directly in this process,
     app      the full application over HTTP (proxy -> ingress -> vision pool -> decoder),
     noop     a Ray Serve app whose FastAPI ingress answers at once (Serve's own floor);
   requests rotate between the three so machine noise hits them alike. Prints p50/p99 and the
   latency the serving path adds over the engine, next to the no-op floor. Text-only and
   with one 256x256 image.
2. Image preprocessing throughput on the same images (JPEG/PNG, 64px to 3000px):
     ingress    what our ingress does: decode, RGB, hash, token count (pixels shipped as uint8)
     pipeline   ingress plus the vision replica's resize and normalisation (the full path)
     mistral    mistral-common's own ImageEncoder (decode, resize, normalise, tokens)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import statistics
import tempfile
import time

import httpx
import numpy as np
import torch
from PIL import Image


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def photo(w: int, h: int, seed: int) -> Image.Image:
    """A smooth image (gradients plus noise) that compresses like a photo, unlike pure noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w, 1), y * 255 / max(h, 1), (x + y) * 127 / max(w + h, 1)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def bench_preprocessing(n: int, tokenizer_file: str) -> None:
    from mistral_common.protocol.instruct.chunk import ImageChunk
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from serving.config import ImageLimits
    from serving.images import decode_image
    from serving.tokenization import SizeOnlyImageEncoder
    from serving.vision_encoder_server import payload_pixels

    sizes = [(64, 64), (640, 480), (1024, 1024), (1280, 720), (2000, 1500), (3000, 2000)]
    blobs = [encode(photo(*sizes[i % len(sizes)], i), "JPEG" if i % 2 else "PNG") for i in range(n)]
    reference = MistralTokenizer.from_file(tokenizer_file).instruct_tokenizer.image_encoder
    size_only = SizeOnlyImageEncoder(reference)
    limits = ImageLimits(max_image_bytes=64 << 20)

    def ingress(data: bytes):
        decoded = decode_image(data, limits, 0)
        size_only(ImageChunk(image=Image.new("1", decoded.size)))
        return decoded.payload(16, 1024)

    def pipeline(data: bytes):
        return payload_pixels(ingress(data), torch.device("cpu"))

    def mistral(data: bytes):
        return reference(ImageChunk(image=Image.open(io.BytesIO(data))))

    totals = {"ingress": 0.0, "pipeline": 0.0, "mistral": 0.0}
    for data in blobs:  # interleaved, so noise falls on all three alike
        for name, fn in (("ingress", ingress), ("pipeline", pipeline), ("mistral", mistral)):
            start = time.perf_counter()
            fn(data)
            totals[name] += time.perf_counter() - start
    rate = {k: n / v for k, v in totals.items()}
    print(f"\nimage preprocessing, {n} images (64px..3000px, JPEG and PNG), images/s:")
    print("| path | images/s | vs mistral-common |")
    print("|---|---|---|")
    for name in ("ingress", "pipeline", "mistral"):
        print(f"| {name} | {rate[name]:.1f} | {rate[name] / rate['mistral']:.2f}x |")


def chat_body(model: str, image_url: str | None) -> dict:
    content: list = [{"type": "text", "text": "Describe the weather in one sentence."}]
    if image_url:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    return {"model": model, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": content}]}


async def bench_latency(ckpt: str, n: int) -> None:
    from ray import serve

    from model.engine.async_engine import AsyncEngine
    from model.engine.local_executor import build_local_engine
    from model.engine.sampling_params import SamplingParams
    from model.loader import load_model
    from serving.app import build_app
    from serving.config import ImageLimits
    from serving.images import decode_image
    from serving.tokenization import ChatTokenizer
    from serving.protocol import ChatCompletionRequest
    from benchmarks.noop_app import noop_app

    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    serve.run(build_app({"model": ckpt, "served_model_name": "bench", "ingress": {"num_cpus": 0.1},
                         "vision": {"num_cpus": 0.1, "num_replicas": 1}, "decoder": {"cpus_per_rank": 0.5}}),
              name="pixtral", route_prefix="/")
    serve.run(noop_app(), name="noop", route_prefix="/noop")
    model = load_model(ckpt)
    engine = AsyncEngine(build_local_engine(ckpt, model=model, num_blocks=512))
    tokenizer = ChatTokenizer(f"{ckpt}/tekken.json")
    png = encode(photo(256, 256, 0), "PNG")
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    params = SamplingParams(max_tokens=8, temperature=0.0)

    async def direct(with_image: bool) -> None:
        images, feats = [], []
        if with_image:
            decoded = decode_image(png, ImageLimits(), 0)
            images = [decoded]
            from serving.vision_encoder_server import payload_pixels
            from model.engine.model_runner import ImageFeatures

            f, g = model.encode_images([payload_pixels(decoded.payload(16, 1024), torch.device("cpu"))])
            feats = [ImageFeatures(f, g[0])]
        prompt = tokenizer.encode(ChatCompletionRequest.model_validate(chat_body("bench", url if with_image else None)),
                                  images)
        async for _ in engine.generate(f"d{time.perf_counter_ns()}", prompt.tokens, params, feats, ["h"] * len(feats)):
            pass

    async with httpx.AsyncClient(base_url="http://127.0.0.1:8123", timeout=60) as client:
        for label, with_image in (("text only", False), ("one 256x256 image", True)):
            body = chat_body("bench", url if with_image else None)
            for _ in range(3):  # warm-up
                await direct(with_image)
                assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
            times: dict[str, list[float]] = {"engine": [], "app": [], "noop": []}
            for _ in range(n):
                for name in times:
                    start = time.perf_counter()
                    if name == "engine":
                        await direct(with_image)
                    elif name == "app":
                        assert (await client.post("/v1/chat/completions", json=body)).status_code == 200
                    else:
                        assert (await client.post("/noop/", json=body)).status_code == 200
                    times[name].append((time.perf_counter() - start) * 1e3)
            p = {k: (statistics.median(v), percentile(v, 0.99)) for k, v in times.items()}
            print(f"\nlatency, {label}, 8 output tokens, {n} requests each (ms):")
            print("| path | p50 | p99 |")
            print("|---|---|---|")
            for name, (p50, p99) in p.items():
                print(f"| {name} | {p50:.1f} | {p99:.1f} |")
            print(f"| app - engine (added by serving) | {p['app'][0] - p['engine'][0]:.1f} | "
                  f"{p['app'][1] - p['engine'][1]:.1f} |")
    engine.shutdown()
    serve.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--images", type=int, default=24)
    ns = parser.parse_args()
    import ray

    from model.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(make_tiny_checkpoint(tmp, shape="12b"))
        bench_preprocessing(ns.images, f"{ckpt}/tekken.json")
        ray.init(include_dashboard=False, log_to_driver=False)
        asyncio.run(bench_latency(ckpt, ns.requests))
        ray.shutdown()


if __name__ == "__main__":
    main()
