"""Decoder autoscaling: the policy alone, then a pool that grows under a burst and shrinks when
idle, every request answered in full while it does."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx

from benchmarks.loadgen import one
from serving.autoscaling import DecoderAutoscalingPolicy
from tests.helpers import wait_healthy


def test_policy_counts_sequences_and_kv_pressure():
    policy = DecoderAutoscalingPolicy(target_sequences=4, kv_high=0.9)
    assert policy.desired(1, {"a": 4}, {"a": 0}, {"a": 0.2}) == 1
    assert policy.desired(1, {"a": 4}, {"a": 5}, {"a": 0.2}) == 3  # 9 sequences, 4 per replica
    assert policy.desired(2, {"a": 2, "b": 1}, {"a": 1, "b": 0}, {"a": 0.95, "b": 0.1}) == 3  # a is starved of KV
    assert policy.desired(2, {"a": 3, "b": 2}, {"a": 0, "b": 0}, {"a": 0.95, "b": 0.1}) == 2  # full, no one waits
    assert policy.desired(4, {"a": 0, "b": 0, "c": 0, "d": 0}, {}, {}) == 3  # down one replica at a time
    assert policy.desired(1, {"a": 0}, {}, {}) == 1


def _decoder_replicas() -> int:
    from ray import serve

    states = serve.status().applications["elastic"].deployments["Decoder"].replica_states
    return states.get("RUNNING", 0)


def _body(max_tokens: int) -> dict:
    return {"model": "pixtral-elastic", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": "Tell me a story."}]}


def test_decoder_pool_grows_under_a_burst_and_shrinks_without_losing_a_stream(served, mistral_12b):
    from ray import serve

    from serving.app import build_app

    args = {
        "model": str(mistral_12b), "served_model_name": "pixtral-elastic", "max_model_len": 1024,
        "ingress": {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1},
        "vision": {"num_cpus": 0.1, "num_replicas": 1},
        "decoder": {"num_replicas": "auto", "min_replicas": 1, "max_replicas": 2, "target_sequences": 2,
                    "upscale_delay_s": 1.0, "downscale_delay_s": 4.0, "look_back_period_s": 2.0,
                    "metrics_interval_s": 0.5, "cpus_per_rank": 0.2, "max_num_seqs": 4, "kv_cache_bytes": 16 << 20},
    }
    base = served + "/elastic"
    serve.run(build_app(args), name="elastic", route_prefix="/elastic", blocking=False)
    results, stop = [], threading.Event()

    async def load(concurrency: int, max_tokens: int) -> None:
        async with httpx.AsyncClient(timeout=180) as client:
            async def worker() -> None:
                while not stop.is_set():
                    results.append(await one(client, f"{base}/v1/chat/completions", _body(max_tokens)))
            await asyncio.gather(*(worker() for _ in range(concurrency)))

    try:
        wait_healthy(base)
        assert _decoder_replicas() == 1
        burst = threading.Thread(target=asyncio.run, args=(load(8, 200),))
        burst.start()
        deadline = time.time() + 120
        while _decoder_replicas() < 2 and time.time() < deadline:
            time.sleep(1)
        grown = _decoder_replicas()
        stop.set()
        burst.join()
        assert grown == 2, "the burst did not add a decoder replica"
        # one stream at a time while the pool shrinks: streams on the replica being removed drain
        stop.clear()
        trickle = threading.Thread(target=asyncio.run, args=(load(1, 60),))
        trickle.start()
        deadline = time.time() + 120
        while _decoder_replicas() > 1 and time.time() < deadline:
            time.sleep(1)
        shrunk = _decoder_replicas()
        time.sleep(2)
        stop.set()
        trickle.join()
        assert shrunk == 1, "the idle pool did not shrink"
        failed = [r for r in results if not r.ok]
        assert results and not failed, failed[:3]
    finally:
        stop.set()
        if "elastic" in serve.status().applications:
            serve.delete("elastic")
