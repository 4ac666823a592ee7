"""`pixtral-serve`: start local Ray and the whole application with one command.

    pixtral-serve                         # the built-in tiny demo checkpoint, CPU, 127.0.0.1:8000
    pixtral-serve --model /models/Pixtral-12B-2409 --device cuda      # bf16 on CUDA unless --dtype says
    pixtral-serve --model /models/pixtral-12b-hf --tokenizer /models/tekken.json   # a community HF repo
    pixtral-serve --model DIR --tensor-parallel-size 8 --vision-replicas auto --vision-max-replicas 4
    pixtral-serve --config models.yaml    # several models in one app (`models:`, see the README)
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import threading
from pathlib import Path

from serving.config import AppConfig, app_args, model_configs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pixtral-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="checkpoint directory (Mistral or Hugging Face format); default: tiny demo")
    p.add_argument("--tokenizer", help="mistral-common tokenizer file (tekken.json or tokenizer.model.v*), for "
                   "checkpoints that ship none, such as community Hugging Face repos")
    p.add_argument("--config", type=Path, help="YAML/JSON file of AppConfig fields (flags override it)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name")
    p.add_argument("--model-alias", action="append", default=None, help="another accepted model name (repeat)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--tensor-parallel-size", type=int)
    p.add_argument("--decoder-replicas", help="a number, or 'auto' to autoscale on the engines' load")
    p.add_argument("--decoder-min-replicas", type=int)
    p.add_argument("--decoder-max-replicas", type=int)
    p.add_argument("--vision-replicas", help="a number, or 'auto' to autoscale")
    p.add_argument("--vision-min-replicas", type=int)
    p.add_argument("--vision-max-replicas", type=int)
    p.add_argument("--vision-gpus", type=float, help="GPUs per vision replica (fractions allowed; default 0.1 on cuda)")
    p.add_argument("--max-model-len", type=int)
    p.add_argument("--max-images", type=int, help="images per request (default 12)")
    p.add_argument("--max-image-pixels", type=int)
    p.add_argument("--kv-cache-gb", type=float, help="KV cache budget on CPU")
    p.add_argument("--stream-interval-ms", type=float,
                   help="send a stream's tokens to the ingress at most once per this many ms after its first "
                   "(default 50; 0: every step's token as it comes)")
    p.add_argument("--direct-streams", action=argparse.BooleanOptionalAction, default=None,
                   help="send the tokens between a stream's first and last to the ingress in one TCP frame per "
                   "step rather than one Ray message per request (default on; see serving/direct_streams.py)")
    p.add_argument("--api-key", action="append", default=None,
                   help="require this Bearer key (repeat for several; or set PIXTRAL_SERVE_API_KEYS=k1,k2)")
    p.add_argument("--num-cpus", type=int, help="logical CPUs for the local Ray cluster")
    p.add_argument("--no-fit", action="store_true",
                   help="keep the configured CPU asks instead of shrinking them to fit the cluster")
    return p.parse_args(argv)


# flags that configure one model; with several models (`models:` in --config) they are refused
MODEL_FLAGS = ("model", "tokenizer", "served_model_name", "model_alias", "device", "dtype", "tensor_parallel_size",
               "decoder_replicas", "decoder_min_replicas", "decoder_max_replicas", "vision_replicas",
               "vision_min_replicas", "vision_max_replicas", "vision_gpus", "max_model_len", "max_images",
               "max_image_pixels", "kv_cache_gb", "stream_interval_ms", "direct_streams")


def _config_file(ns: argparse.Namespace) -> dict:
    if not ns.config:
        return {}
    import yaml

    return yaml.safe_load(ns.config.read_text()) or {}


def _api_keys(ns: argparse.Namespace) -> list[str]:
    return ns.api_key or [k for k in os.environ.get("PIXTRAL_SERVE_API_KEYS", "").split(",") if k]


def configs_from_args(ns: argparse.Namespace) -> list[AppConfig]:
    """One AppConfig per served model: several when --config lists `models:`, else the flags' one."""
    data = _config_file(ns)
    if "models" not in data:
        return [config_from_args(ns)]
    given = [f"--{name.replace('_', '-')}" for name in MODEL_FLAGS if getattr(ns, name) is not None]
    if given:
        raise SystemExit(f"pixtral-serve: {', '.join(given)} configure one model; {ns.config} serves several "
                         "(`models:`): set these in its entries")
    if _api_keys(ns):
        data["api_keys"] = _api_keys(ns)
    return model_configs(data)


def config_from_args(ns: argparse.Namespace) -> AppConfig:
    data = _config_file(ns)
    if ns.model:
        data["model"] = ns.model
    if "model" not in data:
        from model.demo import demo_checkpoint

        data["model"] = str(demo_checkpoint())
        data.setdefault("served_model_name", "pixtral-tiny-demo")
        data.setdefault("model_aliases", ["pixtral-12b-2409"])
        # a laptop: small CPU slices so every deployment fits on two cores
        data.setdefault("ingress", {"num_cpus": 0.2, "max_replicas": 2})
        data.setdefault("vision", {"num_cpus": 0.3, "max_replicas": 2})
        data.setdefault("decoder", {"cpus_per_rank": 1.0, "kv_cache_bytes": 256 << 20})
    simple = {"served_model_name": ns.served_model_name, "model_aliases": ns.model_alias, "device": ns.device,
              "dtype": ns.dtype, "max_model_len": ns.max_model_len, "tokenizer": ns.tokenizer}
    data.update({k: v for k, v in simple.items() if v is not None})
    keys = _api_keys(ns)
    if keys:
        data["api_keys"] = keys
    nested = {
        "decoder": {"tensor_parallel_size": ns.tensor_parallel_size, "num_replicas": _replicas(ns.decoder_replicas),
                    "min_replicas": ns.decoder_min_replicas, "max_replicas": ns.decoder_max_replicas,
                    "kv_cache_bytes": int(ns.kv_cache_gb * 2**30) if ns.kv_cache_gb else None,
                    "stream_interval_ms": ns.stream_interval_ms, "direct_streams": ns.direct_streams},
        "vision": {"num_replicas": _replicas(ns.vision_replicas), "min_replicas": ns.vision_min_replicas,
                   "max_replicas": ns.vision_max_replicas, "num_gpus": ns.vision_gpus},
        "images": {"max_images": ns.max_images, "max_image_pixels": ns.max_image_pixels},
    }
    for section, values in nested.items():
        set_values = {k: v for k, v in values.items() if v is not None}
        if set_values:
            data[section] = {**data.get(section, {}), **set_values}
    return AppConfig.from_dict(data)


def _replicas(value: str | None) -> int | str | None:
    if value is None or value == "auto":
        return value
    return int(value)


def example_curl(base: str, model: str, api_key: str | None) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 60, 30)).save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"}, {"type": "image_url", "image_url": {"url": data_url}}]}]}
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    return f"curl {base}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{json.dumps(body)}'"


def main(argv: list[str] | None = None) -> None:
    ns = parse_args(argv)
    configs = configs_from_args(ns)
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.placement import PlacementError, check_placeable, fit_to_cluster

    ray.init(num_cpus=ns.num_cpus, include_dashboard=False)
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if not ns.no_fit:
        for note in fit_to_cluster(configs, nodes):
            print(f"fitted to this cluster: {note}", flush=True)
    try:
        check_placeable(configs, nodes)
    except PlacementError as exc:
        ray.shutdown()
        raise SystemExit(f"pixtral-serve: {exc}") from None
    serve.start(http_options={"host": ns.host, "port": ns.port})
    serve.run(build_app(app_args(configs)), name="pixtral", route_prefix="/")
    base = f"http://{ns.host}:{ns.port}"
    served = ", ".join(f"{c.served_model_name!r} (checkpoint {c.model})" for c in configs)
    print(f"\npixtral-serve is up: {base}/v1  (model{'s' if len(configs) > 1 else ''} {served})")
    print(f"health: {base}/health   models: {base}/v1/models\n")
    first = configs[0]
    print(example_curl(base, first.served_model_name, first.api_keys[0] if first.api_keys else None), flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
