"""Load on the whole application over loopback: throughput and time to first token.

    python -m benchmarks.load [--requests 300] [--concurrency 32] [--max-tokens 16]

Starts local Ray and the app on the tiny demo-shaped checkpoint, sends a bounded mix (text only,
one or two images from 48x32 to 1024x1024, a third of them streaming) to 127.0.0.1, and prints
requests sent, completed and lost, 5xx seen, requests/s, output tokens/s, and p50/p99 TTFT and
latency. Absolute numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile

from benchmarks.loadgen import run_load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=8124)
    ns = parser.parse_args()
    import httpx
    import ray
    from ray import serve

    from model.tiny import make_tiny_checkpoint
    from serving.app import build_app

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = str(make_tiny_checkpoint(tmp, shape="12b"))
        ray.init(include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": ns.port})
        serve.run(build_app({"model": ckpt, "served_model_name": "bench", "max_model_len": 10240,
                             "ingress": {"num_cpus": 0.2}, "vision": {"num_cpus": 0.2, "num_replicas": 1},
                             "decoder": {"cpus_per_rank": 1.0, "kv_cache_bytes": 256 << 20}}),
                  name="pixtral", route_prefix="/")
        base = f"http://127.0.0.1:{ns.port}"
        assert httpx.get(f"{base}/health", timeout=30).status_code == 200
        asyncio.run(run_load(base, "bench", 8, 8, ns.max_tokens))  # warm-up
        report = asyncio.run(run_load(base, "bench", ns.requests, ns.concurrency, ns.max_tokens))
        tokens = sum(r.tokens for r in report.results)
        print(f"requests sent {ns.requests}, completed {report.completed}, lost {ns.requests - report.completed}, "
              f"5xx {report.server_errors}")
        print(f"{ns.requests / report.elapsed:.1f} requests/s, {tokens / report.elapsed:.1f} output tokens/s "
              f"at concurrency {ns.concurrency} ({report.elapsed:.1f}s)")
        print(f"TTFT p50 {report.percentile('ttft', 0.5) * 1e3:.0f} ms, p99 {report.percentile('ttft', 0.99) * 1e3:.0f} ms; "
              f"latency p50 {report.percentile('latency', 0.5) * 1e3:.0f} ms, p99 {report.percentile('latency', 0.99) * 1e3:.0f} ms")
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
