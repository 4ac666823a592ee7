"""Reliability of the running app: cancellation frees the KV cache."""

from __future__ import annotations

import time

import httpx


def decoder_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Decoder", app_name="pixtral").stats.remote().result()


def test_client_disconnect_aborts_and_frees_blocks(served):
    before = decoder_stats()["generation_tokens"]
    body = {"model": "pixtral-test", "max_tokens": 1500, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story."}]}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{served}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # a few events, then hang up mid-stream
            assert any(line.startswith("data: {") for line in received)
            busy = decoder_stats()
            assert busy["running"] + busy["waiting"] >= 1 and busy["kv_usage"] > 0
    deadline = time.time() + 30
    stats = decoder_stats()
    while time.time() < deadline and (stats["running"] or stats["waiting"] or stats["kv_usage"]):
        time.sleep(0.5)
        stats = decoder_stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["kv_usage"] == 0.0 and stats["free_blocks"] == stats["num_blocks"]
    # the generation stopped early instead of running to max_tokens in the background
    assert stats["generation_tokens"] - before < 1500
