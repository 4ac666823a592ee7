"""Repeated images over 2 replicas of each pool: cache-affinity routing against Serve's default router.

    python -m benchmarks.affinity [--requests 160] [--images 40] [--zipf 1.1] [--concurrency 4] [--rounds 1]

Starts local Ray with the app on a random-weight checkpoint of the 12B architecture (dim 512, 4
layers by default), 2 vision and 2 decoder replicas whose caches hold --cache-images images each
(a working set larger than one replica's cache, as in production). The workload draws images from
a Zipf distribution over --images distinct ones (a product photo or a document page that comes
back again and again), streamed, one image and a short question each.

It runs the same request sequence twice, first with affinity routing, then with Serve's default
router (power of two choices) after a redeploy with fresh caches, each after the same warm-up.
With --rounds N it does that N times, alternating, and pools each router's requests: a noisy
machine's slow minutes then fall on both. Prints requests/s, TTFT p50/p99, the encoder-cache and
prefix-cache hit rates, and the ratios. Absolute numbers depend on the machine; the ratios are the
result.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections import Counter

from benchmarks.loadgen import LoadReport, Result, image_url, one

BLOCK_SIZE = 16


def zipf_sequence(n: int, images: int, s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** s for rank in range(images)]
    return rng.choices(range(images), weights=weights, k=n)


def body(url: str, max_tokens: int) -> dict:
    return {"model": "bench", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in this picture?"}]}]}


async def drive(base: str, urls: list[str], sequence: list[int], concurrency: int, max_tokens: int) -> LoadReport:
    import httpx

    report = LoadReport()
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def send(i: int) -> None:
            async with gate:
                try:
                    report.results.append(await one(client, f"{base}/v1/chat/completions",
                                                    body(urls[sequence[i]], max_tokens)))
                except httpx.HTTPError as exc:
                    report.results.append(Result(599, False, None, 0.0, 0, type(exc).__name__))
        started = time.perf_counter()
        await asyncio.gather(*(send(i) for i in range(len(sequence))))
        report.elapsed = time.perf_counter() - started
    return report


def pool_stats() -> dict[str, int]:
    from ray import serve

    vision = serve.get_deployment_handle("VisionEncoder", app_name="pixtral").broadcast("stats").results()
    decoder = serve.get_deployment_handle("Decoder", app_name="pixtral").broadcast("stats").results()
    return {"vision_hits": sum(s["cache_hits"] for s in vision), "vision_misses": sum(s["cache_misses"] for s in vision),
            "prefix_hits": sum(s["prefix_hit_blocks"] for s in decoder),
            "prefix_queries": sum(s["prefix_queried_blocks"] for s in decoder)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--cache-images", type=int, default=12, help="images each replica's caches hold")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--port", type=int, default=8126)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the two routers this many times, pooled")
    ns = parser.parse_args()
    import httpx
    import ray
    from ray import serve

    from model.tiny import make_tiny_checkpoint, tiny_args
    from serving.app import build_app

    heads = max(ns.dim // 64, 1)
    overrides = {"dim": ns.dim, "n_layers": ns.layers, "head_dim": 64, "n_heads": heads,
                 "n_kv_heads": max(heads // 4, 1), "hidden_dim": 4 * ns.dim}
    args = tiny_args("12b", overrides)
    patches = (ns.size // 16) ** 2
    vision_bytes = patches * args.vision_encoder.hidden_size * 4
    prompt_blocks = (patches + ns.size // 16 + 16) // BLOCK_SIZE + 2
    block_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * BLOCK_SIZE * 4
    urls = [image_url((ns.size, ns.size), seed) for seed in range(ns.images)]
    warmup = zipf_sequence(ns.warmup, ns.images, ns.zipf, seed=1)
    sequence = zipf_sequence(ns.requests, ns.images, ns.zipf, seed=2)
    results = {name: (LoadReport(), Counter()) for name in ("affinity", "default")}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(make_tiny_checkpoint(tmp, shape="12b", overrides=overrides))
        ray.init(include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": ns.port})
        base = f"http://127.0.0.1:{ns.port}"
        for name, affinity in [("affinity", True), ("default", False)] * ns.rounds:
            if "pixtral" in serve.status().applications:
                serve.delete("pixtral")  # fresh replicas, so empty caches, for every run
            serve.run(build_app({
                "model": ckpt, "served_model_name": "bench", "max_model_len": 4096,
                "ingress": {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1},
                "vision": {"num_cpus": 0.1, "num_replicas": 2, "cache_bytes": ns.cache_images * vision_bytes,
                           "affinity_routing": affinity},
                "decoder": {"num_replicas": 2, "cpus_per_rank": 0.5, "affinity_routing": affinity,
                            "kv_cache_bytes": (ns.cache_images + ns.concurrency) * prompt_blocks * block_bytes}}),
                name="pixtral", route_prefix="/")
            assert httpx.get(f"{base}/health", timeout=60).status_code == 200
            asyncio.run(drive(base, urls, warmup, ns.concurrency, ns.max_tokens))
            before = pool_stats()
            report = asyncio.run(drive(base, urls, sequence, ns.concurrency, ns.max_tokens))
            after = pool_stats()
            pooled, counts = results[name]
            pooled.results += report.results
            pooled.elapsed += report.elapsed
            counts.update({k: after[k] - before[k] for k in after})
            print(f"{name}: {ns.requests / report.elapsed:.2f} req/s", flush=True)
        serve.shutdown()
        ray.shutdown()
    print(f"{ns.rounds} x {ns.requests} streamed requests per router (each after {ns.warmup} warm-up), Zipf {ns.zipf} over {ns.images} images of "
          f"{ns.size}x{ns.size}, concurrency {ns.concurrency}, caches of {ns.cache_images} images per replica, "
          f"2 vision + 2 decoder replicas, dim {ns.dim} x {ns.layers} layers")
    print(f"{'router':10} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'enc-cache hits':>15} {'prefix hits':>12} {'lost':>5}")
    for name, (report, d) in results.items():
        vision_rate = d["vision_hits"] / max(d["vision_hits"] + d["vision_misses"], 1)
        prefix_rate = d["prefix_hits"] / max(d["prefix_queries"], 1)
        print(f"{name:10} {len(report.results) / report.elapsed:7.2f} {report.percentile('ttft', 0.5) * 1e3:7.0f}ms "
              f"{report.percentile('ttft', 0.99) * 1e3:7.0f}ms {vision_rate:14.0%} {prefix_rate:11.0%} "
              f"{len(report.results) - report.completed:5d}")
    (a, _), (b, _) = results["affinity"], results["default"]
    print(f"affinity / default: throughput {b.elapsed / a.elapsed:.2f}x, "
          f"TTFT p50 {a.percentile('ttft', 0.5) / b.percentile('ttft', 0.5):.2f}x, "
          f"p99 {a.percentile('ttft', 0.99) / b.percentile('ttft', 0.99):.2f}x (lower TTFT is better)")


if __name__ == "__main__":
    main()
