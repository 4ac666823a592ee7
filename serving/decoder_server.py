"""The decoder deployment: one replica = one engine = one placement group of tensor-parallel ranks.

With tensor_parallel_size 1 the model runs in the replica itself; otherwise the replica holds the
engine's bookkeeping and drives rank actors placed in its own placement group (bundle 0 is the
replica, bundles 1..tp the ranks).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch
from ray import serve

from model.engine.async_engine import AsyncEngine, EngineDeadError
from model.engine.llm_engine import RequestError, RequestFailure, RequestOutput
from model.engine.local_executor import KVBudget, build_local_engine
from model.engine.model_runner import ImageFeatures
from model.engine.sampling_params import SamplingParams
from serving.config import AppConfig
from serving.direct_streams import DirectStream, Item, Outboxes
from serving.health import start_heap_trimmer
from serving.logs import setup_logging
from serving.metrics import count, metric
from serving.routing import prefix_key


@dataclass
class GenerateRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    image_hashes: list[str]
    # tokens the decoder's stream interval never merges past (the ingress reads tool calls from [TOOL_CALLS] on)
    stream_boundaries: frozenset[int] = frozenset()
    # the ingress's mailbox: outputs between the first and the last go there in per-step frames
    direct: DirectStream | None = None

    @property
    def affinity_key(self) -> str:
        """The decoder routes a prompt to the replica whose prefix cache likely holds its start."""
        return prefix_key(self.image_hashes, self.prompt_token_ids)


def _failed(request: GenerateRequest, failure: RequestFailure) -> RequestOutput:
    return RequestOutput(request.request_id, [], "", finished=True, finish_reason="error", failure=failure)


@serve.deployment(name="Decoder")
class DecoderServer:
    def __init__(self, config: dict) -> None:
        setup_logging()
        cfg = AppConfig.from_dict(config)
        d = cfg.decoder
        kv = KVBudget(gpu_memory_utilization=d.gpu_memory_utilization, cpu_bytes=d.kv_cache_bytes,
                      profile_tokens=d.max_num_batched_tokens)
        overrides = dict(max_num_seqs=d.max_num_seqs, max_num_batched_tokens=d.max_num_batched_tokens,
                         enable_prefix_caching=d.enable_prefix_caching)
        if cfg.max_model_len:
            overrides["max_model_len"] = cfg.max_model_len
        if d.tensor_parallel_size == 1:
            device = "cuda" if cfg.device == "cuda" else "cpu"
            if device == "cpu" and d.cpu_threads:
                torch.set_num_threads(d.cpu_threads)
            from model.loader import load_model

            model = load_model(cfg.model, device=device, dtype=getattr(torch, cfg.dtype), with_vision_encoder=False,
                               tokenizer=cfg.tokenizer)
            engine = build_local_engine(cfg.model, model=model, kv=kv, block_size=d.block_size, tokenizer=cfg.tokenizer,
                                        decode_batch_sizes=d.cuda_graph_batch_sizes, **overrides)
        else:
            from ray.util import get_current_placement_group

            from serving.tp_executor import RankResources, build_tp_engine

            # bundle 0 of the replica's placement group is the replica itself; the ranks take 1..tp
            resources = RankResources(cfg.device, d.cpus_per_rank, d.gpus_per_rank, d.cpu_threads)
            engine, _ = build_tp_engine(cfg.model, d.tensor_parallel_size, resources, cfg.dtype, kv, d.block_size,
                                        pg=get_current_placement_group(), first_bundle=1, tokenizer=cfg.tokenizer,
                                        decode_batch_sizes=d.cuda_graph_batch_sizes, step_timeout_s=d.step_timeout_s,
                                        **overrides)
        self.engine = AsyncEngine(engine, stream_interval_s=d.stream_interval_ms / 1000, step_timeout_s=d.step_timeout_s)
        self.outboxes = Outboxes(interval_s=d.stream_interval_ms / 1000)
        self.tags = {"model": cfg.served_model_name}
        self._reported = dict.fromkeys(["preemptions", "prefix_queried_blocks", "prefix_hit_blocks", "failed_requests",
                                        "direct_frames", "direct_fallbacks"], 0)
        threading.Thread(target=self._report_engine_metrics, name="engine-metrics", daemon=True).start()
        start_heap_trimmer()

    def _report_engine_metrics(self) -> None:
        """Gauges every second; counters as the increase since the last report."""
        counters = {"preemptions": "pixtral_preemptions_total", "prefix_queried_blocks": "pixtral_prefix_cache_queries_total",
                    "prefix_hit_blocks": "pixtral_prefix_cache_hits_total", "failed_requests": "pixtral_request_failures_total",
                    "direct_frames": "pixtral_direct_stream_frames_total",
                    "direct_fallbacks": "pixtral_direct_stream_fallbacks_total"}
        while True:
            stats = self.engine.stats()
            metric("pixtral_kv_cache_usage_ratio").set(stats.kv_usage, tags=self.tags)
            metric("pixtral_running_sequences").set(stats.running, tags=self.tags)
            metric("pixtral_waiting_sequences").set(stats.waiting, tags=self.tags)
            values = {**vars(stats), "direct_frames": self.outboxes.frames, "direct_fallbacks": self.outboxes.fallbacks}
            for field, name in counters.items():
                count(name, values[field] - self._reported[field], self.tags)
                self._reported[field] = values[field]
            time.sleep(1.0)

    def info(self) -> dict:
        import ray

        c = self.engine.engine.config
        return {"max_model_len": c.max_model_len, "num_blocks": c.num_blocks, "block_size": c.block_size,
                "node_id": ray.get_runtime_context().get_node_id()}

    async def generate(self, request: GenerateRequest, *images: ImageFeatures):
        """Stream RequestOutputs; the image features arrive straight from the vision pool. With
        `request.direct`, each message is a list of sequenced items instead (`_direct`)."""
        if request.direct is None:
            async for out in self._outputs(request, list(images)):
                yield out
            return
        async for items in self._direct(request, request.direct, list(images)):
            yield items

    async def _direct(self, request: GenerateRequest, direct: DirectStream, images: list[ImageFeatures]):
        """The first output and the last through Serve, the ones between in the mailbox's frames
        (serving/direct_streams.py). Every Serve message carries each output since the one before
        it, so the last repairs any frame a failed connection lost. Without a working connection,
        every output goes through Serve."""
        conn = self.outboxes.get(direct.mailbox)
        if conn is None:
            self.outboxes.fallbacks += 1
        # a connection coalesces its frames; without one the engine coalesces, as for a plain stream
        outputs = self._outputs(request, images, 0.0 if conn is not None else None)
        sent: list[RequestOutput] = []  # every output so far, by sequence number
        through_serve = 0  # the outputs before this one went through Serve
        serve_at = time.monotonic()  # when the last Serve message went
        hold_s = 0.0  # how long an output may wait for the next Serve message
        try:
            async for out in outputs:
                seq = len(sent)
                sent.append(out)
                if seq > 0 and not out.finished:
                    if conn is not None and not conn.broken:
                        conn.send(direct.key, seq, out, request.stream_boundaries)
                        continue
                    if conn is not None:
                        # broken: this output and the rest go through Serve, at most one message
                        # per interval, since the engine is not coalescing this stream. A held
                        # output goes with the next one after the interval, or with the last.
                        conn, hold_s = None, self.engine.stream_interval_s
                        self.outboxes.fallbacks += 1
                    elif time.monotonic() - serve_at < hold_s:
                        continue
                items: list[Item] = [(s, s, sent[s]) for s in range(through_serve, seq + 1)]
                through_serve = seq + 1
                serve_at = time.monotonic()
                yield items
        finally:
            if conn is not None:
                conn.forget(direct.key)

    async def _outputs(self, request: GenerateRequest, images: list[ImageFeatures], interval_s: float | None = None):
        try:
            async for out in self.engine.generate(request.request_id, request.prompt_token_ids, request.params,
                                                  images, request.image_hashes, request.stream_boundaries,
                                                  stream_interval_s=interval_s):
                if out.queue_time_s is not None:
                    metric("pixtral_queue_time_seconds").observe(out.queue_time_s, tags=self.tags)
                yield out
        except RequestError as exc:
            yield _failed(request, RequestFailure("invalid", str(exc)))
        except EngineDeadError as exc:
            yield _failed(request, RequestFailure("unavailable", str(exc), exc.retryable))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """What the decoder autoscaling policy scales on (Serve calls this when autoscaling is on)."""
        stats = self.engine.stats()
        return {"running_sequences": stats.running, "waiting_sequences": stats.waiting,
                "kv_cache_usage": stats.kv_usage}

    def stats(self) -> dict:
        # the replica as the affinity ring names it
        return {**vars(self.engine.stats()), "replica": serve.get_replica_context().replica_id.unique_id,
                "direct_frames": self.outboxes.frames, "direct_fallbacks": self.outboxes.fallbacks}

    def check_health(self) -> None:
        stuck = self.engine.stuck_for()
        if stuck is not None:
            raise RuntimeError(f"an engine step has run for {stuck:.0f} s, over decoder.step_timeout_s: "
                               "the device may be hung")
        if not self.engine.healthy:
            raise RuntimeError(f"engine stopped: {self.engine.error!r}")
