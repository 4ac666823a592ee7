"""Our server against a peer OpenAI-compatible server (vLLM's CPU build) on the same checkpoint.

    bash ../shared/peers/vllm-cpu.sh CKPT 8951 4096 &                  # the peer, model "peer"
    pixtral-serve --model CKPT --port 8000 &                           # ours
    python -m benchmarks.vs_peer --ours http://127.0.0.1:8000 --ours-model NAME \\
        --peer http://127.0.0.1:8951 [--concurrency 1 8 32] [--max-tokens 64] [--rounds 2]

Both servers get the same streamed, greedy requests (distinct text prompts, optionally one image
each with --image W), at each concurrency, alternating between them within every round so a noisy
machine's slow minutes fall on both. Output tokens/s counts the tokens each server reports in its
usage; TTFT is arrival to the first content. The best round's throughput and the pooled TTFT p50
are printed, with ours / peer ratios. Absolute numbers depend on the machine; the ratios are the
result.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

from benchmarks.loadgen import Result, image_url, one


def body(i: int, model: str, max_tokens: int, image: int) -> dict:
    content: list = [{"type": "text", "text": f"Request {i}: tell me a long story about the number {i * 7919}."}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image_url((image, image), i)}})
    return {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": content}]}


async def drive(base: str, model: str, n: int, concurrency: int, max_tokens: int, image: int, offset: int
                ) -> tuple[list[Result], float]:
    gate = asyncio.Semaphore(concurrency)
    results: list[Result] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def guarded(i: int) -> None:
            async with gate:
                results.append(await one(client, f"{base}/v1/chat/completions", body(offset + i, model, max_tokens, image)))
        start = time.perf_counter()
        await asyncio.gather(*(guarded(i) for i in range(n)))
        return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ours", required=True)
    parser.add_argument("--ours-model", required=True)
    parser.add_argument("--peer", required=True)
    parser.add_argument("--peer-model", default="peer")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image", type=int, default=0, help="side of one image per request (0: text only)")
    parser.add_argument("--rounds", type=int, default=2)
    ns = parser.parse_args()
    servers = {"ours": (ns.ours, ns.ours_model), "peer": (ns.peer, ns.peer_model)}
    for name, (base, model) in servers.items():  # warm-up: first requests compile and allocate
        results, _ = asyncio.run(drive(base, model, 2, 2, 8, ns.image, offset=10**6))
        if not all(r.ok for r in results):
            raise SystemExit(f"{name} at {base} did not answer: {[r.detail for r in results]}")
    best: dict[tuple[str, int], float] = {}
    ttfts: dict[tuple[str, int], list[float]] = {}
    offset = 0
    for round_ in range(ns.rounds):
        for c in ns.concurrency:
            n = max(8, 2 * c)
            order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
            for name in order:
                base, model = servers[name]
                # the same prompts for both servers, new ones each round (no prefix-cache carry-over)
                results, elapsed = asyncio.run(drive(base, model, n, c, ns.max_tokens, ns.image, offset))
                failed = [r.detail for r in results if not r.ok]
                if failed:
                    raise SystemExit(f"{name} failed {len(failed)} of {n} requests at c={c}: {failed[:2]}")
                rate = sum(r.tokens for r in results) / elapsed
                best[name, c] = max(best.get((name, c), 0.0), rate)
                ttfts.setdefault((name, c), []).extend(r.ttft for r in results if r.ttft is not None)
                print(f"round {round_ + 1} c={c:<3} {name}: {rate:7.1f} tok/s", flush=True)
            offset += n
    mode = f"one {ns.image}x{ns.image} image each" if ns.image else "text only"
    print(f"streamed greedy requests of {ns.max_tokens} tokens, {mode}, best of {ns.rounds} rounds")
    print(f"{'c':>3} {'ours tok/s':>11} {'peer tok/s':>11} {'ratio':>7} {'ours TTFT p50':>14} {'peer TTFT p50':>14} {'ratio':>7}")
    for c in ns.concurrency:
        o, p = best["ours", c], best["peer", c]
        to, tp = statistics.median(ttfts["ours", c]), statistics.median(ttfts["peer", c])
        print(f"{c:3d} {o:11.1f} {p:11.1f} {o / p:6.2f}x {to * 1e3:12.0f}ms {tp * 1e3:12.0f}ms {to / tp:6.2f}x")


if __name__ == "__main__":
    main()
