"""A tensor-parallel decoder (TP=2 on CPU) whose rank dies: 503 for in-flight work, then recovery."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import ray

from tests.helpers import delete_app, deploy_beside


@pytest.fixture(scope="module")
def tp_app(served, mistral_12b):
    args = {"model": str(mistral_12b), "served_model_name": "pixtral-tp",
            "ingress": {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1},
            "vision": {"num_cpus": 0.1, "num_replicas": 1},
            "decoder": {"tensor_parallel_size": 2, "cpus_per_rank": 0.4, "kv_cache_bytes": 32 << 20},
            "max_model_len": 2048}
    yield deploy_beside(served, args, "tp", timeout=240)
    delete_app("tp")


def rank_actors() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith("pixtral-tp-rank"))


def chat(base: str, max_tokens: int, timeout: float = 120) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", timeout=timeout, json={
        "model": "pixtral-tp", "max_tokens": max_tokens, "temperature": 0,
        "messages": [{"role": "user", "content": "Tell me a long story."}]})


def test_killed_rank_gives_503_then_recovers(tp_app):
    assert chat(tp_app, 4).status_code == 200
    ranks = rank_actors()
    assert len(ranks) == 2, ranks
    in_flight: dict = {}
    worker = threading.Thread(target=lambda: in_flight.update(r=chat(tp_app, 1800), at=time.time()))
    worker.start()
    time.sleep(3)  # the long request is generating now
    killed_at = time.time()
    ray.kill(ray.get_actor([r for r in ranks if "rank1" in r][0], namespace=None), no_restart=True)
    worker.join(timeout=200)
    response = in_flight["r"]
    assert response.status_code == 503, response.text[:300]
    assert response.headers.get("retry-after") and response.json()["error"]["code"] == "model_unavailable"
    failed_at = in_flight["at"]
    recovered = None
    while time.time() - killed_at < 240:
        try:
            if chat(tp_app, 4, timeout=60).status_code == 200:
                recovered = time.time()
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    assert recovered is not None, "the decoder never recovered"
    new_ranks = rank_actors()
    assert len(new_ranks) == 2 and not set(new_ranks) & set(ranks), (ranks, new_ranks)
    print(f"rank killed: in-flight request answered 503 after {failed_at - killed_at:.1f}s; "
          f"new requests served {recovered - killed_at:.1f}s after the kill")
