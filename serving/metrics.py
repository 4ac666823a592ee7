"""Prometheus metrics of every deployment, exported through Ray's metrics agent on each node.

Ray Serve metrics carry `deployment`, `replica` and `application` labels by themselves; we add
`model` (and `route`/`status_code` for HTTP). Ray prefixes exported names with `ray_`, so
`pixtral_request_latency_seconds` is scraped as `ray_pixtral_request_latency_seconds_bucket` etc.
Names and units follow Prometheus conventions (seconds, `_total` for counters).
"""

from __future__ import annotations

from functools import cache

from ray.serve import metrics

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
TOKEN_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
LOOP_LAG_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
COUNT_BUCKETS = [1, 2, 3, 4, 6, 8, 12, 16, 32, 64]  # Ray wants positive bounds; le=1 holds 0 and 1

# name -> (kind, description, buckets, extra label keys); `model` is on every metric
DEFINITIONS = {
    "pixtral_http_requests_total": ("counter", "HTTP requests by route and status code", None, ("route", "status_code")),
    "pixtral_request_latency_seconds": ("histogram", "End-to-end chat completion latency", LATENCY_BUCKETS, ()),
    "pixtral_time_to_first_token_seconds": ("histogram", "Time from request arrival to the first token", LATENCY_BUCKETS, ()),
    "pixtral_inter_token_latency_seconds": ("histogram", "Time between streamed tokens (an output's gap spread over its tokens)", TOKEN_LATENCY_BUCKETS, ()),
    "pixtral_queue_time_seconds": ("histogram", "Time a request waited in the decoder replica before its first step (the running step included)", LATENCY_BUCKETS, ()),
    "pixtral_prompt_tokens_total": ("counter", "Prompt tokens (text and image) of finished requests", None, ()),
    "pixtral_generation_tokens_total": ("counter", "Generated tokens", None, ()),
    "pixtral_image_tokens_total": ("counter", "Image tokens ([IMG], [IMG_BREAK], [IMG_END]) in prompts", None, ()),
    "pixtral_images_per_request": ("histogram", "Images per chat request", COUNT_BUCKETS, ()),
    "pixtral_vision_encode_latency_seconds": ("histogram", "Vision encoder time per batch", LATENCY_BUCKETS, ()),
    "pixtral_vision_batch_size": ("histogram", "Images per vision encoder batch", COUNT_BUCKETS, ()),
    "pixtral_vision_cache_hits_total": ("counter", "Encoder-cache hits (by image content hash)", None, ()),
    "pixtral_vision_cache_misses_total": ("counter", "Encoder-cache misses", None, ()),
    "pixtral_kv_cache_usage_ratio": ("gauge", "Fraction of KV-cache blocks in use", None, ()),
    "pixtral_running_sequences": ("gauge", "Sequences in the running batch", None, ()),
    "pixtral_waiting_sequences": ("gauge", "Sequences waiting to be scheduled", None, ()),
    "pixtral_preemptions_total": ("counter", "Sequences preempted (KV blocks freed, recomputed later)", None, ()),
    "pixtral_prefix_cache_queries_total": ("counter", "KV blocks looked up in the prefix cache", None, ()),
    "pixtral_prefix_cache_hits_total": ("counter", "KV blocks found in the prefix cache", None, ()),
    "pixtral_direct_stream_frames_total": ("counter", "Frames a decoder replica sent to ingress mailboxes (each holds a step's outputs for one ingress)", None, ()),
    "pixtral_direct_stream_fallbacks_total": ("counter", "Requests streamed through Serve because their ingress's mailbox could not be reached", None, ()),
    "pixtral_request_failures_total": ("counter", "Requests the engine failed alone (their step raised); it carried on", None, ()),
    "pixtral_affinity_routes_total": ("counter", "Requests routed by cache affinity: to the replica their key hashes "
                                      "to (affine), or past it by the load bound (spilled)", None, ("pool", "outcome")),
    "pixtral_event_loop_lag_seconds": ("histogram", "How late the ingress event loop woke a 50 ms timer", LOOP_LAG_BUCKETS, ()),
}


@cache
def metric(name: str):
    """The process-wide metric object (created on first use, inside a replica)."""
    kind, description, buckets, labels = DEFINITIONS[name]
    tag_keys = ("model", *labels)
    if kind == "counter":
        return metrics.Counter(name, description=description, tag_keys=tag_keys)
    if kind == "gauge":
        return metrics.Gauge(name, description=description, tag_keys=tag_keys)
    return metrics.Histogram(name, description=description, boundaries=buckets, tag_keys=tag_keys)


def exported_names() -> set[str]:
    """The series names Prometheus sees for our metrics (after Ray's `ray_` prefix)."""
    names = set()
    for name, (kind, *_rest) in DEFINITIONS.items():
        base = f"ray_{name}"
        names |= {f"{base}_bucket", f"{base}_count", f"{base}_sum"} if kind == "histogram" else {base}
    return names


def count(name: str, value: float, tags: dict[str, str]) -> None:
    """Add to a counter; Ray counters refuse increments of zero."""
    if value > 0:
        metric(name).inc(value, tags=tags)
