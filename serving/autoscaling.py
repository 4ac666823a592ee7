"""Decoder autoscaling on what limits an LLM engine: sequences and KV-cache space.

Serve's default policy divides ongoing requests by a target per replica. For a decoder that is
the wrong signal: one request may be a short answer or a 4,000-token image prompt, and what makes
users wait is sequences the engine cannot run yet (its batch or its KV cache is full). So each
decoder replica reports its engine's running and waiting sequences and KV-cache usage
(`DecoderServer.record_autoscaling_stats`), and `DecoderAutoscalingPolicy`, a Serve custom
autoscaling policy (run in Serve's controller), asks for:

- enough replicas that each has at most `target_sequences` running or waiting sequences;
- one more replica than now while a replica has sequences waiting and its KV cache above
  `kv_high`: its batch cannot grow, whatever the count says;
- fewer replicas when the count allows, one at a time. Serve removes a replica only after its
  streams drain (graceful_shutdown_timeout_s), and applies its delays (upscale_delay_s,
  downscale_delay_s) and the min/max bounds on top of this policy.

Each replica is a whole placement group (its TP ranks), so a new replica brings its GPUs with it;
on KubeRay the Ray autoscaler adds a decoder pod when a new placement group cannot be placed.
"""

from __future__ import annotations

import math


class DecoderAutoscalingPolicy:
    """Serve custom autoscaling policy (class form: built once with its kwargs, called per tick)."""

    def __init__(self, target_sequences: float = 48.0, kv_high: float = 0.9) -> None:
        self.target_sequences = target_sequences
        self.kv_high = kv_high

    def __call__(self, ctx) -> tuple[int, dict]:
        metrics = ctx.aggregated_metrics
        running = metrics.get("running_sequences", {})
        waiting = metrics.get("waiting_sequences", {})
        kv = metrics.get("kv_cache_usage", {})
        current = ctx.current_num_replicas
        if not running and not waiting:  # no report yet (replicas starting): keep what Serve targets
            return ctx.target_num_replicas, {}
        return self.desired(current, running, waiting, kv), {}

    def desired(self, current: int, running: dict, waiting: dict, kv: dict) -> int:
        """Replicas wanted, from per-replica running and waiting sequences and KV usage."""
        load = sum(running.values()) + sum(waiting.values())
        by_count = math.ceil(load / self.target_sequences) if load else 0
        starved = any(waiting.get(r, 0) > 0 and kv.get(r, 0.0) >= self.kv_high for r in set(waiting) | set(kv))
        wanted = max(by_count, current + 1 if starved else 0)
        if wanted < current:
            wanted = current - 1  # one at a time: each removal drains that replica's streams first
        return max(wanted, 1)


def policy_config(target_sequences: float, kv_high: float) -> dict:
    """The `policy` entry of the decoder's autoscaling_config."""
    return {"policy_function": "serving.autoscaling:DecoderAutoscalingPolicy",
            "policy_kwargs": {"target_sequences": target_sequences, "kv_high": kv_high}}
