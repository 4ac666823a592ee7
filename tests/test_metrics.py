"""Known traffic in, the real Prometheus endpoints of every Ray node scraped and parsed."""

from __future__ import annotations

import base64
import io
import time

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from serving.metrics import DEFINITIONS, exported_names
from tests.helpers import random_image

MODEL = "pixtral-test"


def scrape(ports: list[int]) -> dict[tuple[str, tuple], float]:
    """Every sample of our metrics on every node: (series name, sorted labels) -> value."""
    samples: dict[tuple[str, tuple], float] = {}
    for port in ports:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.startswith("ray_pixtral_"):
                    key = (s.name, tuple(sorted(s.labels.items())))  # one series per replica
                    samples[key] = samples.get(key, 0.0) + s.value
    return samples


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lbl), v in samples.items()
               if n == name and all(dict(lbl).get(k) == val for k, val in labels.items()) and "le" not in dict(lbl))


def increase(before: dict, after: dict, name: str, **labels) -> float:
    """Growth of the series present now (a replica killed earlier may have left stale series behind)."""
    grown = {key: v - before.get(key, 0.0) for key, v in after.items()}
    return total(grown, name, **labels)


def bucket(samples: dict, name: str, le: str) -> float:
    return sum(v for (n, lbl), v in samples.items() if n == name and dict(lbl).get("le") == le)


def settled(ports: list[int]) -> dict[tuple[str, tuple], float]:
    """A scrape once earlier tests' traffic has ended and been exported: requests a client gave up on
    can still finish, and Ray exports each second. Two scrapes 2 s apart agree on the request counts."""
    def counts(samples: dict) -> dict:
        return {k: v for k, v in samples.items()
                if k[0] in ("ray_pixtral_http_requests_total", "ray_pixtral_generation_tokens_total")}

    deadline = time.time() + 60
    last = scrape(ports)
    while True:
        time.sleep(2)
        now = scrape(ports)
        if counts(now) == counts(last) or time.time() > deadline:
            return now
        last = now


def image_url(seed: int) -> str:
    buf = io.BytesIO()
    random_image(40, 30, seed).save(buf, format="PNG")  # 3x2 patches: 8 image tokens
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# the same first KV block in every request: the prefix cache hits from the second request on
COMMON_PREFIX = "Please look very carefully at the following two pictures and describe both of them in detail:"


def test_metrics_match_known_traffic(ray_cluster, served):
    client = openai.OpenAI(base_url=f"{served}/v1", api_key="x", max_retries=0, timeout=120)
    before = settled(ray_cluster.metrics_ports)
    prompt_tokens = generated = 0
    for i in range(3):  # 3 requests with 2 images each (one image repeats: an encoder-cache hit)
        r = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": COMMON_PREFIX + f" request {i}"},
                                         {"type": "image_url", "image_url": {"url": image_url(100 + i)}},
                                         {"type": "image_url", "image_url": {"url": image_url(7)}}]}])
        prompt_tokens += r.usage.prompt_tokens
        generated += r.usage.completion_tokens
    stream = client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "stream please"}])
    usage = [c.usage for c in stream if c.usage][0]
    prompt_tokens += usage.prompt_tokens
    generated += usage.completion_tokens
    assert httpx.post(f"{served}/v1/chat/completions", json={"model": "nope", "messages": []}).status_code == 400

    deadline = time.time() + 60
    while True:  # Ray's agents export every second or so; wait until all of it arrived
        after = scrape(ray_cluster.metrics_ports)
        delta = lambda name, **lbl: increase(before, after, name, **lbl)
        done = (delta("ray_pixtral_http_requests_total", route="/v1/chat/completions", status_code="200") == 4
                and delta("ray_pixtral_generation_tokens_total") == generated
                and delta("ray_pixtral_queue_time_seconds_count") == 4
                and delta("ray_pixtral_prefix_cache_hits_total") >= 2
                and delta("ray_pixtral_vision_cache_hits_total") >= 2
                and total(after, "ray_pixtral_running_sequences") == 0)
        if done or time.time() > deadline:
            break
        time.sleep(1)

    assert delta("ray_pixtral_http_requests_total", route="/v1/chat/completions", status_code="200") == 4
    assert delta("ray_pixtral_http_requests_total", route="/v1/chat/completions", status_code="400") == 1
    assert delta("ray_pixtral_prompt_tokens_total", model=MODEL) == prompt_tokens
    assert delta("ray_pixtral_generation_tokens_total", model=MODEL) == generated == 3 * 4 + 5
    assert delta("ray_pixtral_image_tokens_total") == 3 * 2 * 8
    # Ray rebuilds histogram sums from bucket midpoints, so check the buckets, which are exact
    assert delta("ray_pixtral_images_per_request_count") == 4
    grown = {key: v - before.get(key, 0.0) for key, v in after.items()}
    images_le = lambda le: bucket(grown, "ray_pixtral_images_per_request_bucket", le)
    assert (images_le("1.0"), images_le("2.0")) == (1, 4)  # one text-only request, three with two images
    assert delta("ray_pixtral_request_latency_seconds_count") == 4
    assert delta("ray_pixtral_time_to_first_token_seconds_count") == 4
    assert delta("ray_pixtral_inter_token_latency_seconds_count") == 3 * 3 + 4
    assert delta("ray_pixtral_queue_time_seconds_count") == 4
    assert delta("ray_pixtral_vision_cache_hits_total") >= 2  # the repeated image, on requests 2 and 3
    assert delta("ray_pixtral_vision_cache_misses_total") + delta("ray_pixtral_vision_cache_hits_total") == 6
    batches = delta("ray_pixtral_vision_batch_size_count")
    assert 1 <= batches <= delta("ray_pixtral_vision_cache_misses_total")
    assert delta("ray_pixtral_vision_encode_latency_seconds_count") == batches
    assert delta("ray_pixtral_prefix_cache_queries_total") > 0
    assert delta("ray_pixtral_prefix_cache_hits_total") >= 2
    assert total(after, "ray_pixtral_kv_cache_usage_ratio") == 0.0  # idle: every block free
    assert total(after, "ray_pixtral_running_sequences") == 0 and total(after, "ray_pixtral_waiting_sequences") == 0

    names = {n for n, _ in after}
    # no preemption, no request the engine had to fail, and no stream without its mailbox, in this traffic
    missing = exported_names() - names - {"ray_pixtral_preemptions_total", "ray_pixtral_request_failures_total",
                                          "ray_pixtral_direct_stream_fallbacks_total"}
    assert not missing, missing
    unnamed = [(n, lbl) for n, lbl in after if not dict(lbl).get("model")]
    assert not unnamed, [{k: v for k, v in l if k in ("model", "route", "status_code", "deployment")} for _, l in unnamed[:3]]  # every series names its model
    foreign = [(n, lbl) for (n, lbl), v in grown.items() if v and dict(lbl).get("model") != MODEL]
    assert not foreign, foreign[:3]  # our traffic, our model
    assert set(DEFINITIONS) == {n.removeprefix("ray_").removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
                                for n in exported_names()}
