"""A bounded soak: good and hostile traffic mixed, for a few minutes, against the whole app.

    python -m benchmarks.soak [--minutes 3] [--concurrency 12] [--hostile-share 0.5]

Starts local Ray, a loopback image server with hostile endpoints (gzip bombs, a slow drip, a
redirect loop, huge and animated images), a file root holding a FIFO, and the app on the tiny
checkpoint. Then sends, until the time is up, a mix of good requests (text, one or two images,
a third streaming) and hostile ones of every kind the reliability section lists. Prints, per
kind, the status codes seen; whether any good request was lost or any response was a 5xx; the
ingress event-loop lag and /health/live latency; and the resident memory of every replica
process after warm-up, at its peak and at the end.

Passes (exit 0) only if every good request completed, no response was a 5xx, every hostile
request got the status its kind expects, and no replica's private resident memory (its own heap,
RssAnon) grew by more than --max-growth-mb from the middle to the last third of the run (the lowest
of the samples taken every 5 s in each; the first third is left to the heaps to settle, after a
warm-up that also fills the encoder cache, set to 32 MiB here, to its bound). Shared memory (the
pages of Ray's object store a replica has read zero-copy) is reported beside it: it grows as more
of the store is touched, up to the store's fixed size.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import io
import json
import os
import random
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from PIL import Image

from benchmarks.loadgen import one, request_body

MODEL = "soak"


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


class HostileImages(BaseHTTPRequestHandler):
    """Endpoints an attacker would point image URLs at."""

    GZIP_BOMB = gzip.compress(b"\0" * (64 << 20))
    OK_PNG = encoded(Image.new("RGB", (64, 48), "navy"), "PNG")

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        try:
            self._serve()
        except OSError:
            pass  # the client gave up (as it should): nothing to do

    def _serve(self) -> None:
        if self.path == "/gzip":
            self._send(self.GZIP_BOMB, {"Content-Encoding": "gzip"})
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(600):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.5)
        elif self.path.startswith("/loop"):
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/ok.png":
            self._send(self.OK_PNG, {"Content-Type": "image/png"})
        else:
            self._send(b"", {}, 404)

    def _send(self, body: bytes, headers: dict, status: int = 200) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def hostile_catalogue(images: str, file_root: str) -> dict:
    """kind -> (body maker(rng) -> JSON-able dict or raw bytes, expected statuses). Bodies are
    built lazily and the large ones once."""
    user = lambda content, **kw: {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **kw}
    image = lambda url: user([{"type": "text", "text": "what is it?"}, {"type": "image_url", "image_url": {"url": url}}])
    bomb = data_url(encoded(Image.new("L", (20000, 20000)), "PNG"))
    huge_jpeg = data_url(encoded(Image.new("RGB", (6000, 5000), "gray"), "JPEG"), "image/jpeg")
    frames = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
    animated = data_url(encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), "image/gif")
    ok_png = encoded(Image.new("RGB", (40, 30), "teal"), "PNG")
    wrapped = base64.b64encode(ok_png).decode()

    def mutated_png(rng: random.Random) -> dict:
        data = bytearray(ok_png)
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return image(data_url(bytes(data)))

    deep = ('{"model": "soak", "messages": [{"role": "user", "content": "x"}], "metadata": '
            + "[" * 50_000 + "]" * 50_000 + "}").encode()
    return {
        "tiny temperature": (lambda r: user("hello", temperature=1e-38), {200}),
        "bad json": (lambda r: b'{"model": "soak", "messages": [', {400}),
        "deep json": (lambda r: deep, {400}),
        "user then assistant": (lambda r: {"model": MODEL, "messages": [{"role": "user", "content": "a"},
                                                                        {"role": "assistant", "content": "b"}]}, {400}),
        "unknown route": (None, {404}),
        "n x max_tokens": (lambda r: user("hi", n=16, max_tokens=8000), {400}),
        "long stop string": (lambda r: user("hi", stop=["s" * 1000]), {400}),
        "whitespace prompt": (lambda r: user("\n \t " * 150_000), {400}),
        "gzip bomb url": (lambda r: image(f"{images}/gzip"), {400}),
        "slow drip url": (lambda r: image(f"{images}/drip"), {400}),
        "redirect loop": (lambda r: image(f"{images}/loop"), {400}),
        "metadata url": (lambda r: image("http://169.254.169.254/latest/meta-data/"), {400}),
        "malformed url": (lambda r: image("http://[::1/x.png"), {400}),
        "fifo file url": (lambda r: image(f"file://{file_root}/pipe.png"), {400}),
        "decompression bomb": (lambda r: image(bomb), {400}),
        "over the pixel cap": (lambda r: image(huge_jpeg), {400}),
        "animated gif": (lambda r: image(animated), {400}),
        "mutated png": (mutated_png, {200, 400}),
        "wrapped base64": (lambda r: image("data:image/png;BASE64," + "\n".join(
            wrapped[i:i + 64] for i in range(0, len(wrapped), 64))), {200}),
        "fetched image": (lambda r: image(f"{images}/ok.png"), {200}),
    }


async def send_hostile(client: httpx.AsyncClient, base: str, kind: str, maker, rng: random.Random) -> int:
    if maker is None:
        return (await client.get(f"{base}/v1/{rng.choice(['nope', 'engines', 'chat'])}")).status_code
    body = maker(rng)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = await client.post(f"{base}/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    if r.status_code >= 400:
        error = r.json()["error"]  # OpenAI's error JSON, always
        assert error["message"] and "Traceback" not in r.text, r.text[:200]
    return r.status_code


def replica_memory() -> dict[str, tuple[float, float]]:
    """(private, shared) resident MiB of every Serve replica process on this machine, by deployment
    and pid. Private (RssAnon) is the process's own heap: what a leak grows. Shared (RssFile +
    RssShmem) is mostly Ray's object store, mapped into the process as it reads image features and
    pixels out of it zero-copy; it grows as more of the store's pages are touched, up to the store's
    fixed size, and is counted once for the whole node."""
    import psutil  # Ray ships it (ray/thirdparty_files, on the path once ray is imported)

    out = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])  # ray::ServeReplica:<app>:<deployment>[.<method>]
        if "ServeReplica:" not in title:
            continue
        try:
            with open(f"/proc/{proc.info['pid']}/status") as f:
                kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k.startswith("Rss")}
        except OSError:
            continue  # the replica exited
        deployment = title.split()[0].split("ServeReplica:", 1)[1].split(".")[0]
        out[f"{deployment} (pid {proc.info['pid']})"] = (kb["RssAnon"] / 1024, (kb["RssFile"] + kb["RssShmem"]) / 1024)
    return out


async def soak(base: str, images: str, file_root: str, seconds: float, concurrency: int, hostile_share: float,
               lag) -> dict:
    catalogue = hostile_catalogue(images, file_root)
    statuses: dict[str, Counter] = defaultdict(Counter)
    good_lost: list[str] = []
    memory: list[tuple[float, dict]] = []
    probes: list[float] = []
    lags: list[float] = []
    rng = random.Random(2026)
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency + 8)) as client:
        async def worker() -> None:
            while time.monotonic() < deadline:
                i = next(counter)
                if rng.random() < hostile_share:
                    kind = rng.choice(sorted(catalogue))
                    maker, _ = catalogue[kind]
                    try:
                        statuses[kind][await send_hostile(client, base, kind, maker, random.Random(i))] += 1
                    except httpx.HTTPError as exc:
                        statuses[kind][type(exc).__name__] += 1
                else:
                    result = await one(client, f"{base}/v1/chat/completions", request_body(i, MODEL, 8))
                    statuses["good"][result.status] += 1
                    if not result.ok:
                        good_lost.append(f"{result.status} {result.detail[:120]}")

        async def watcher() -> None:
            start = time.monotonic()
            while time.monotonic() < deadline:
                began = time.perf_counter()
                await client.get(f"{base}/health/live")
                probes.append(time.perf_counter() - began)
                lags.append(await asyncio.to_thread(lag))
                if not memory or time.monotonic() - start - memory[-1][0] >= 5:
                    memory.append((time.monotonic() - start, await asyncio.to_thread(replica_memory)))
                await asyncio.sleep(1.0)

        await asyncio.gather(watcher(), *(worker() for _ in range(concurrency)))
    return {"statuses": statuses, "good_lost": good_lost, "memory": memory, "probes": probes, "lags": lags,
            "catalogue": catalogue}


def report(result: dict, seconds: float, max_growth_mb: float) -> bool:
    ok = True
    print(f"\n{'kind':<22} {'sent':>6}  statuses")
    for kind, counts in sorted(result["statuses"].items()):
        expected = {200} if kind == "good" else result["catalogue"][kind][1]
        bad = {s: n for s, n in counts.items() if s not in expected}
        ok &= not bad
        print(f"{kind:<22} {sum(counts.values()):>6}  {dict(sorted(counts.items(), key=str))}"
              + (f"   UNEXPECTED {bad}" if bad else ""))
    all_statuses = Counter()
    for counts in result["statuses"].values():
        all_statuses.update(counts)
    fivexx = sum(n for s, n in all_statuses.items() if isinstance(s, int) and s >= 500)
    good = sum(result["statuses"]["good"].values())
    print(f"\ngood requests: {good} sent, {good - len(result['good_lost'])} completed, "
          f"{len(result['good_lost'])} lost; 5xx responses: {fivexx}; total requests {sum(all_statuses.values())} "
          f"in {seconds:.0f} s")
    for line in result["good_lost"][:5]:
        print("  lost:", line)
    probes, lags = result["probes"], result["lags"]
    print(f"/health/live: {len(probes)} probes, p50 {statistics.median(probes) * 1e3:.0f} ms, "
          f"max {max(probes) * 1e3:.0f} ms; ingress event-loop lag per second: p50 "
          f"{statistics.median(lags) * 1e3:.0f} ms, max {max(lags) * 1e3:.0f} ms")
    memory = result["memory"]
    third = max(len(memory) // 3, 1)
    print("\nresident memory (MiB) per replica, sampled every 5 s: after warm-up / peak / end, and the floor (lowest "
          "sample) of each minute: what stays, not transient batches. Growth: the last third's floor minus the "
          "middle third's (the heaps settle in the first); and minus the first third's, for the record.\n"
          "private = the process's own heap (the criterion); shared = pages of Ray's object store it has read "
          "(bounded by the store's size, counted once per node)")
    for name in sorted(memory[0][1]):
        for kind, index in (("private", 0), ("shared", 1)):
            series = [m[name][index] for _, m in memory if name in m]
            floors = [min(series[i:i + 12]) for i in range(0, len(series), 12)]
            growth = min(series[-third:]) - min(series[third:-third] or series)
            since_start = min(series[-third:]) - min(series[:third])
            if kind == "private":
                ok &= growth <= max_growth_mb
            print(f"  {name:<36} {kind:<8} {series[0]:6.0f} {max(series):6.0f} {series[-1]:6.0f}   floors per minute "
                  f"{' '.join(f'{m:.0f}' for m in floors)}   growth {growth:+.0f} ({since_start:+.0f} since the first "
                  "third)")
    ok &= not result["good_lost"] and not fivexx
    print("\nPASS" if ok else "\nFAIL")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--hostile-share", type=float, default=0.5)
    parser.add_argument("--max-growth-mb", type=float, default=32.0)
    parser.add_argument("--warmup-s", type=float, default=120.0)
    parser.add_argument("--port", type=int, default=8125)
    ns = parser.parse_args()
    import ray
    from ray import serve

    from model.tiny import make_tiny_checkpoint
    from serving.app import build_app

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), HostileImages)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    images = f"http://127.0.0.1:{httpd.server_address[1]}"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(make_tiny_checkpoint(os.path.join(tmp, "ckpt"), shape="12b"))
        file_root = os.path.join(tmp, "images")
        os.makedirs(file_root)
        os.mkfifo(os.path.join(file_root, "pipe.png"))
        ray.init(include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": ns.port})
        serve.run(build_app({"model": ckpt, "served_model_name": MODEL, "max_model_len": 10240,
                             "images": {"allow_private_urls": ["127.0.0.1"], "file_root": file_root,
                                        "fetch_timeout_s": 3.0, "request_images_timeout_s": 5.0},
                             "ingress": {"num_cpus": 0.2},
                             "vision": {"num_cpus": 0.2, "num_replicas": 1, "cache_bytes": 32 << 20},
                             "decoder": {"cpus_per_rank": 1.0, "kv_cache_bytes": 256 << 20}}),
                  name="pixtral", route_prefix="/")
        base = f"http://127.0.0.1:{ns.port}"
        ingress = serve.get_deployment_handle("OpenAIIngress", app_name="pixtral")
        lag = lambda: ingress.take_event_loop_lag.remote().result()
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        # warm-up: every kind several times, so that lazily built state (caches, the allocators'
        # heaps around the largest prefills) is in place before memory is first read
        asyncio.run(soak(base, images, file_root, ns.warmup_s, ns.concurrency, ns.hostile_share, lag))
        started = time.monotonic()
        result = asyncio.run(soak(base, images, file_root, ns.minutes * 60, ns.concurrency, ns.hostile_share, lag))
        passed = report(result, time.monotonic() - started, ns.max_growth_mb)
        serve.shutdown()
        ray.shutdown()
    httpd.shutdown()
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
