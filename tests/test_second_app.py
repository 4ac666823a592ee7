"""A second application on the session cluster: vision-pool autoscaling, and API keys."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import delete_app, deploy_beside, random_image

KEY = "test-key-0123456789"


@pytest.fixture(scope="module")
def second_app(served, mistral_12b):
    args = {
        "model": str(mistral_12b), "served_model_name": "pixtral-secure", "api_keys": [KEY, "another-key"],
        "ingress": {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1},
        # slow batches (wait 0.4 s for a second image) so a burst keeps many encodes in flight
        "vision": {"num_cpus": 0.1, "num_replicas": "auto", "min_replicas": 1, "max_replicas": 2,
                   "target_ongoing_requests": 1, "upscale_delay_s": 1.0, "downscale_delay_s": 4.0,
                   "max_batch_size": 2, "batch_wait_timeout_s": 0.4, "cache_bytes": 0},
        "decoder": {"cpus_per_rank": 0.3, "kv_cache_bytes": 32 << 20},
        "max_model_len": 1024,
    }
    yield deploy_beside(served, args, "second")
    delete_app("second")


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_api_keys_guard_every_v1_route(second_app):
    body = {"model": "pixtral-secure", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    for headers in ({}, auth("wrong"), {"Authorization": KEY}, auth(KEY + "x")):
        for method, route in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("POST", "/v1/chat/token_count")):
            r = httpx.request(method, second_app + route, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (headers, route, r.status_code)
            assert r.json()["error"]["type"] == "authentication_error"
            assert KEY not in r.text
    assert httpx.post(second_app + "/v1/chat/completions", json=body, headers=auth(KEY), timeout=60).status_code == 200
    assert httpx.get(second_app + "/v1/models", headers=auth("another-key")).status_code == 200
    assert httpx.get(second_app + "/health").status_code == 200  # probes need no key


def vision_replicas() -> int:
    from ray import serve

    status = serve.status().applications["second"].deployments["VisionEncoder"]
    return status.replica_states.get("RUNNING", 0)


def image_body(seed: int) -> dict:
    buf = io.BytesIO()
    random_image(64, 48, seed).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"model": "pixtral-secure", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}] * 3}]}


def test_vision_pool_scales_up_under_burst_and_back_down(second_app):
    assert vision_replicas() == 1
    stop = threading.Event()

    async def burst() -> None:
        async with httpx.AsyncClient(timeout=120, headers=auth(KEY)) as client:
            seed = 0
            while not stop.is_set():  # keep ~12 requests (36 image encodes) in flight
                batch = [client.post(second_app + "/v1/chat/completions", json=image_body(seed + i)) for i in range(12)]
                seed += 12
                results = await asyncio.gather(*batch)
                assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]

    worker = threading.Thread(target=lambda: asyncio.run(burst()), daemon=True)
    worker.start()
    peak, deadline = 1, time.time() + 90
    while time.time() < deadline and peak < 2:
        peak = max(peak, vision_replicas())
        time.sleep(0.5)
    stop.set()
    worker.join(timeout=120)
    assert peak == 2, "the vision pool did not scale up under the burst"
    deadline = time.time() + 90
    while time.time() < deadline and vision_replicas() != 1:
        time.sleep(1)
    assert vision_replicas() == 1, "the vision pool did not scale back down when idle"


def test_logs_never_hold_keys_or_image_bytes(second_app):

    body = image_body(4242)
    url = body["messages"][0]["content"][0]["image_url"]["url"]
    fragment = url.split(",", 1)[1][100:160]  # 60 characters of the image's base64
    assert httpx.post(second_app + "/v1/chat/completions", json=body, headers=auth(KEY), timeout=60).status_code == 200
    bad = dict(body, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url[:-200]}}]}])
    assert httpx.post(second_app + "/v1/chat/completions", json=bad, headers=auth(KEY), timeout=60).status_code == 400
    time.sleep(2)  # let the log files flush
    logs = Path(_session_dir()) / "logs"
    offenders = []
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err"):
            text = path.read_text(errors="ignore")
            if KEY in text or fragment in text:
                offenders.append(path.name)
    assert not offenders, offenders


def _session_dir() -> str:
    import ray

    return ray._private.worker.global_worker.node.get_session_dir_path()


def test_graceful_shutdown_lets_streams_finish(second_app):
    """Deleting the application drains: a stream already running completes with [DONE]."""
    from ray import serve

    body = {"model": "pixtral-secure", "max_tokens": 600, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "A long answer, please."}]}
    events, deleter = [], None
    with httpx.Client(timeout=120, headers=auth(KEY)) as client:
        with client.stream("POST", second_app + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                events.append(line)
                if deleter is None and len(events) > 4:
                    deleter = threading.Thread(target=lambda: serve.delete("second"))
                    deleter.start()
    deleter.join(timeout=120)
    assert "second" not in serve.status().applications  # the app was really shut down meanwhile
    usage = [json.loads(e[6:])["usage"] for e in events if e.startswith("data: {") and '"usage": {' in e]
    assert usage and usage[-1]["completion_tokens"] == 600  # every token arrived
    assert events[-2:] == ["data: [DONE]", ""] or events[-1] == "data: [DONE]", events[-3:]
    assert any('"finish_reason": "length"' in e for e in events)
