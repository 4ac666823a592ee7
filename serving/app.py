"""`build_app(args)` composes the whole application from one config.

One ingress, and for each served model (one, or several under `models:`) its own vision pool and
decoder. Used by `serve run deploy/<config>.yaml` (import path `serving.app:build_app`), by the
`pixtral-serve` command and by the tests.
"""

from __future__ import annotations

from typing import Any

from ray.serve import Application

from serving.autoscaling import policy_config
from serving.config import AppConfig, deployment_names, model_configs
from serving.decoder_server import DecoderServer
from serving.ingress import MODEL_NAME_ENV, OpenAIIngress
from serving.routing import router_config
from serving.vision_encoder_server import VisionEncoderServer


def _resources(accelerator_type: str | None, extra: dict[str, float]) -> dict[str, float]:
    resources = dict(extra)
    if accelerator_type:
        resources[f"accelerator_type:{accelerator_type}"] = 0.001
    return resources


def vision_options(cfg: AppConfig) -> dict[str, Any]:
    v = cfg.vision
    actor = {"num_cpus": v.num_cpus, "num_gpus": v.num_gpus, "resources": _resources(v.accelerator_type, v.resources)}
    options: dict[str, Any] = {"ray_actor_options": actor, "max_ongoing_requests": max(4 * v.max_batch_size, 16)}
    if v.num_replicas == "auto":
        options["autoscaling_config"] = {"min_replicas": v.min_replicas, "max_replicas": v.max_replicas,
                                         "initial_replicas": v.min_replicas,
                                         "target_ongoing_requests": v.target_ongoing_requests,
                                         "upscale_delay_s": v.upscale_delay_s, "downscale_delay_s": v.downscale_delay_s}
    else:
        options["num_replicas"] = int(v.num_replicas)
    if v.affinity_routing:
        options["request_router_config"] = router_config("vision", cfg.served_model_name, v.affinity_load_factor)
    return options


def decoder_bundles(cfg: AppConfig) -> list[dict[str, float]]:
    """Bundle 0 holds the replica (engine bookkeeping); with TP > 1, one more bundle per rank."""
    d = cfg.decoder
    extra = _resources(d.accelerator_type, d.resources)
    gpu = d.gpus_per_rank if cfg.device == "cuda" else 0.0
    if d.tensor_parallel_size == 1:  # the replica runs the model itself
        return [{"CPU": d.cpus_per_rank, **({"GPU": gpu} if gpu else {}), **extra}]
    rank = {"CPU": d.cpus_per_rank, **({"GPU": gpu} if gpu else {}), **extra}
    return [{"CPU": 0.1, **extra}] + [dict(rank) for _ in range(d.tensor_parallel_size)]


def decoder_options(cfg: AppConfig) -> dict[str, Any]:
    d = cfg.decoder
    bundles = decoder_bundles(cfg)
    first = bundles[0]
    actor = {"num_cpus": first["CPU"], "num_gpus": first.get("GPU", 0.0),
             "resources": {k: v for k, v in first.items() if k not in ("CPU", "GPU")}}
    if d.num_replicas == "auto":
        autoscaling = {"min_replicas": d.min_replicas, "max_replicas": d.max_replicas, "initial_replicas": d.min_replicas,
                       "upscale_delay_s": d.upscale_delay_s, "downscale_delay_s": d.downscale_delay_s,
                       "look_back_period_s": d.look_back_period_s,
                       "policy": policy_config(d.target_sequences, d.kv_high)}
        if d.metrics_interval_s != 10.0:  # Serve warns that the field is deprecated; set only when asked
            autoscaling["metrics_interval_s"] = d.metrics_interval_s
        replicas = {"autoscaling_config": autoscaling}
    else:
        replicas = {"num_replicas": d.num_replicas}
    return {**replicas, "ray_actor_options": actor,
            "placement_group_bundles": bundles,
            "placement_group_strategy": "STRICT_PACK" if cfg.device == "cuda" else "PACK",
            # the engine batches up to max_num_seqs; a bounded number more wait inside it, the
            # next ones in Serve's queue, and past max_queued_requests callers get a 503 at once
            "max_ongoing_requests": d.max_num_seqs * 2, "max_queued_requests": d.max_queued_requests,
            "health_check_period_s": 5.0, "health_check_timeout_s": 30.0, "graceful_shutdown_timeout_s": 60.0,
            **({"request_router_config": router_config("decoder", cfg.served_model_name, d.affinity_load_factor)}
               if d.affinity_routing else {})}


def ingress_options(cfg: AppConfig, label: str | None = None) -> dict[str, Any]:
    """The ingress of the app whose first model is `cfg` (the ingress settings are app-wide).

    `label`: the `model` label of the ingress's own series (event-loop lag) and of HTTP requests
    that name no served model (401s, bad JSON): the served name when there is one model, every
    served name joined by commas when there are several, so that no series is unlabelled. The HTTP
    middleware runs outside the class, so it gets it from the environment.
    """
    i = cfg.ingress
    label = cfg.served_model_name if label is None else label
    actor = {"num_cpus": i.num_cpus, "runtime_env": {"env_vars": {MODEL_NAME_ENV: label}}}
    return {"ray_actor_options": actor,
            "autoscaling_config": {"min_replicas": i.min_replicas, "max_replicas": i.max_replicas,
                                   "initial_replicas": i.min_replicas,
                                   "target_ongoing_requests": i.target_ongoing_requests},
            "max_ongoing_requests": i.max_ongoing_requests, "max_queued_requests": i.max_queued_requests}


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application; `model: demo` means the built-in tiny checkpoint (made once, cached)."""
    configs = model_configs(_demo_resolved(args))
    several = len(configs) > 1
    pools = []
    for cfg in configs:
        config = cfg.to_dict()
        vision_name, decoder_name = deployment_names(cfg, several)
        vision = VisionEncoderServer.options(name=vision_name, **vision_options(cfg)).bind(config)
        decoder = DecoderServer.options(name=decoder_name, **decoder_options(cfg)).bind(config)
        pools += [vision, decoder]
    ingress = ingress_options(configs[0], ",".join(cfg.served_model_name for cfg in configs))
    return OpenAIIngress.options(**ingress).bind([cfg.to_dict() for cfg in configs], *pools)


def _demo_resolved(args: dict[str, Any]) -> dict[str, Any]:
    """`model: demo` (at the top or in a `models:` entry) -> the built-in tiny checkpoint's path."""
    def resolve(entry: dict[str, Any]) -> dict[str, Any]:
        if entry.get("model") != "demo":
            return entry
        from model.demo import demo_checkpoint

        return {**entry, "model": str(demo_checkpoint())}

    args = resolve(args)
    if isinstance(args.get("models"), list):
        args = {**args, "models": [resolve(e) if isinstance(e, dict) else e for e in args["models"]]}
    return args
