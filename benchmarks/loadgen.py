"""A bounded loopback load generator, shared by benchmarks/load.py and the load and fault tests."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

SIZES = [None, (48, 32), (200, 120), (640, 480), (1024, 1024)]  # None: text only


def image_url(size: tuple[int, int], seed: int) -> str:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(i: int, model: str, max_tokens: int) -> dict:
    rng = random.Random(i)
    content: list = [{"type": "text", "text": f"Request {i}: describe what you see."}]
    for _ in range(rng.choice([0, 1, 1, 2])):
        size = rng.choice(SIZES[1:])
        content.append({"type": "image_url", "image_url": {"url": image_url(size, rng.randrange(10**6))}})
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": content}]}
    if i % 3 == 0:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


@dataclass
class Result:
    status: int
    ok: bool  # a full, well-formed answer
    ttft: float | None
    latency: float
    tokens: int
    detail: str = ""


@dataclass
class LoadReport:
    results: list[Result] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def completed(self) -> int:
        return sum(r.ok for r in self.results)

    @property
    def server_errors(self) -> int:
        return sum(r.status >= 500 for r in self.results)

    def percentile(self, what: str, q: float) -> float:
        values = sorted(getattr(r, what) for r in self.results if getattr(r, what) is not None)
        return values[min(int(q * len(values)), len(values) - 1)] if values else float("nan")


async def one(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    start = time.perf_counter()
    if not body.get("stream"):
        r = await client.post(url, json=body)
        latency = time.perf_counter() - start
        if r.status_code != 200:
            return Result(r.status_code, False, None, latency, 0, r.text[:200])
        data = r.json()
        choice = data["choices"][0]
        ok = (isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
              and data["usage"]["completion_tokens"] >= 1)
        return Result(200, ok, latency, latency, data["usage"]["completion_tokens"])
    ttft, tokens, done, finish, usage = None, 0, False, None, None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            return Result(r.status_code, False, None, time.perf_counter() - start, 0, (await r.aread())[:200].decode())
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return Result(200, False, ttft, time.perf_counter() - start, tokens, line[:200])
            for choice in event["choices"]:
                if choice["delta"].get("content") and ttft is None:
                    ttft = time.perf_counter() - start
                finish = choice["finish_reason"] or finish
            usage = event.get("usage") or usage
    ok = done and finish in ("stop", "length") and usage is not None and usage["completion_tokens"] >= 1
    return Result(200, ok, ttft, time.perf_counter() - start, usage["completion_tokens"] if usage else 0)


async def run_load(base: str, model: str, n: int, concurrency: int, max_tokens: int = 6,
                   headers: dict | None = None, timeout: float = 120) -> LoadReport:
    url = f"{base}/v1/chat/completions"
    report = LoadReport()
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=timeout, headers=headers,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def guarded(i: int) -> None:
            async with gate:
                try:
                    report.results.append(await one(client, url, request_body(i, model, max_tokens)))
                except httpx.HTTPError as exc:
                    report.results.append(Result(599, False, None, 0.0, 0, f"{type(exc).__name__}"))
        start = time.perf_counter()
        await asyncio.gather(*(guarded(i) for i in range(n)))
        report.elapsed = time.perf_counter() - start
    return report
