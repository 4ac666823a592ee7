"""Render the KubeRay manifests in k8s/ from the Serve configs in deploy/, so the two never drift.

    python -m serving.k8s_manifests            # rewrite k8s/pixtral-*.yaml and k8s/grafana-dashboard.json
    python -m serving.k8s_manifests --check    # exit 1 if a committed manifest differs

Each RayService embeds its deploy/ Serve config (serveConfigV2) verbatim, with a CPU head group
(Serve proxy and ingress), a vision worker group on small GPUs that the Ray autoscaler scales, and
per model a decoder worker group whose pods hold every GPU of one placement group. Weights come
from a read-only PersistentVolumeClaim mounted at /models.

With several models in one app (deploy/pixtral-multi.yaml), each decoder group advertises a Ray
resource of its own that only its model's decoder asks for: the autoscaler then adds the pod shape
that model needs (one GPU for a 12B replica, eight for a Large one), never the other.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "ghcr.io/pixtral-serve/pixtral-serve:0.1.0"  # built from this repository on rayproject/ray
RAY_VERSION = "2.60.0"
METRICS_PORT = 8080


@dataclass(frozen=True)
class GPUGroup:
    name: str
    gpus_per_pod: int
    gpu_product: str  # node label nvidia.com/gpu.product (NVIDIA GPU feature discovery)
    cpus: int
    memory: str
    min_replicas: int
    max_replicas: int
    # a Ray resource every pod of the group advertises (1 unit): the deployment that asks for it
    # lands here, and the autoscaler knows which group to grow for it
    resource: str | None = None


@dataclass(frozen=True)
class Target:
    name: str
    serve_config: str  # file in deploy/
    pvc: str
    vision: GPUGroup
    decoders: tuple[GPUGroup, ...]  # one per model, in the order of the config's models


VISION_L4 = GPUGroup("vision-l4", 1, "NVIDIA-L4", 8, "32Gi", 1, 8)
TARGETS = [
    Target("pixtral-12b", "pixtral-12b.yaml", "pixtral-12b-weights", vision=VISION_L4,
           decoders=(GPUGroup("decoder-h100", 1, "NVIDIA-H100-80GB-HBM3", 16, "128Gi", 2, 4),)),
    Target("pixtral-large", "pixtral-large.yaml", "pixtral-large-weights", vision=VISION_L4,
           decoders=(GPUGroup("decoder-h100x8", 8, "NVIDIA-H100-80GB-HBM3", 96, "1600Gi", 1, 2),)),
    Target("pixtral-multi", "pixtral-multi.yaml", "pixtral-weights", vision=VISION_L4, decoders=(
        GPUGroup("decoder-12b-h100", 1, "NVIDIA-H100-80GB-HBM3", 16, "128Gi", 1, 4, resource="decoder-pixtral-12b"),
        GPUGroup("decoder-large-h100x8", 8, "NVIDIA-H100-80GB-HBM3", 96, "1600Gi", 1, 2,
                 resource="decoder-pixtral-large"))),
]


def _container(name: str, cpus: int, memory: str, gpus: int, head: bool) -> dict:
    resources = {"cpu": str(cpus), "memory": memory}
    if gpus:
        resources["nvidia.com/gpu"] = str(gpus)
    ports = [{"containerPort": METRICS_PORT, "name": "metrics"}]
    if head:
        ports += [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                  {"containerPort": 10001, "name": "client"}, {"containerPort": 8000, "name": "serve"}]
    container = {
        "name": name, "image": IMAGE, "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": resources, "limits": resources}, "ports": ports,
        "volumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
        "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
    }
    if head:  # the head pod is ready while some model answers /health (its vision pool and decoder run)
        container["readinessProbe"] = {"httpGet": {"path": "/health", "port": 8000},
                                       "initialDelaySeconds": 30, "periodSeconds": 10, "failureThreshold": 6}
    return container


def _pod(target: Target, container: dict, gpu: GPUGroup | None) -> dict:
    spec = {"containers": [container], "volumes": [
        {"name": "models", "persistentVolumeClaim": {"claimName": target.pvc, "readOnly": True}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}}]}
    if gpu:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": gpu.gpu_product}
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": "pixtral-serve", "app.kubernetes.io/instance": target.name}},
            "spec": spec}


def _worker_group(target: Target, gpu: GPUGroup) -> dict:
    params = {"metrics-export-port": str(METRICS_PORT)}
    if gpu.resource:  # KubeRay's format for `ray start --resources`: "{\"name\": 1}", quotes included
        params["resources"] = '"' + json.dumps({gpu.resource: 1}).replace('"', '\\"') + '"'
    return {
        "groupName": gpu.name, "replicas": gpu.min_replicas, "minReplicas": gpu.min_replicas,
        "maxReplicas": gpu.max_replicas,
        "rayStartParams": params,
        "template": _pod(target, _container("ray-worker", gpu.cpus, gpu.memory, gpu.gpus_per_pod, head=False), gpu),
    }


def render(target: Target) -> dict:
    serve_config = (ROOT / "deploy" / target.serve_config).read_text()
    head = {
        # no GPU on the head: it runs the Serve proxy and the CPU ingress replicas
        "rayStartParams": {"dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT)},
        "template": _pod(target, _container("ray-head", 8, "32Gi", 0, head=True), None),
    }
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": target.name, "labels": {"app.kubernetes.io/name": "pixtral-serve"}},
        "spec": {
            "serveConfigV2": serve_config,
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 300},
                "headGroupSpec": head,
                "workerGroupSpecs": [_worker_group(target, g) for g in (target.vision, *target.decoders)],
            },
        },
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the embedded Serve config) as readable literal blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def manifest_text(target: Target) -> str:
    header = (f"# Generated by `python -m serving.k8s_manifests` from deploy/{target.serve_config}: do not edit.\n"
              f"# kubectl apply -f k8s/{target.name}.yaml  (needs KubeRay and a PVC {target.pvc!r} with the weights)\n")
    return header + yaml.dump(render(target), Dumper=_Dumper, sort_keys=False, width=120)


# Grafana panels: (title, unit, PromQL). Every metric here is one serving/metrics.py exports.
PANELS = [
    ("Requests/s by model and status", "reqps", "sum by (model, status_code) (rate(ray_pixtral_http_requests_total[1m]))"),
    ("Requests/s by route and status", "reqps", "sum by (route, status_code) (rate(ray_pixtral_http_requests_total[1m]))"),
    ("Generated tokens/s by model", "short", "sum by (model) (rate(ray_pixtral_generation_tokens_total[1m]))"),
    ("End-to-end latency p50 / p99", "s", "histogram_quantile(0.5, sum by (le) (rate(ray_pixtral_request_latency_seconds_bucket[5m])))"),
    ("", "s", "histogram_quantile(0.99, sum by (le) (rate(ray_pixtral_request_latency_seconds_bucket[5m])))"),
    ("Time to first token p50 / p99", "s", "histogram_quantile(0.5, sum by (le) (rate(ray_pixtral_time_to_first_token_seconds_bucket[5m])))"),
    ("", "s", "histogram_quantile(0.99, sum by (le) (rate(ray_pixtral_time_to_first_token_seconds_bucket[5m])))"),
    ("Inter-token latency p50 / p99", "s", "histogram_quantile(0.5, sum by (le) (rate(ray_pixtral_inter_token_latency_seconds_bucket[5m])))"),
    ("", "s", "histogram_quantile(0.99, sum by (le) (rate(ray_pixtral_inter_token_latency_seconds_bucket[5m])))"),
    ("Queue time p99", "s", "histogram_quantile(0.99, sum by (le) (rate(ray_pixtral_queue_time_seconds_bucket[5m])))"),
    ("Tokens/s: prompt, generated, image", "short", "sum(rate(ray_pixtral_prompt_tokens_total[1m]))"),
    ("", "short", "sum(rate(ray_pixtral_generation_tokens_total[1m]))"),
    ("", "short", "sum(rate(ray_pixtral_image_tokens_total[1m]))"),
    ("Images per request (mean)", "short", "sum(rate(ray_pixtral_images_per_request_sum[5m])) / sum(rate(ray_pixtral_images_per_request_count[5m]))"),
    ("Vision encode latency p99", "s", "histogram_quantile(0.99, sum by (le) (rate(ray_pixtral_vision_encode_latency_seconds_bucket[5m])))"),
    ("Vision batch size (mean)", "short", "sum(rate(ray_pixtral_vision_batch_size_sum[5m])) / sum(rate(ray_pixtral_vision_batch_size_count[5m]))"),
    ("Encoder-cache hit ratio", "percentunit", "sum(rate(ray_pixtral_vision_cache_hits_total[5m])) / (sum(rate(ray_pixtral_vision_cache_hits_total[5m])) + sum(rate(ray_pixtral_vision_cache_misses_total[5m])))"),
    ("KV-cache usage by replica", "percentunit", "max by (replica) (ray_pixtral_kv_cache_usage_ratio)"),
    ("Running / waiting sequences", "short", "sum(ray_pixtral_running_sequences)"),
    ("", "short", "sum(ray_pixtral_waiting_sequences)"),
    ("Preemptions/s", "short", "sum(rate(ray_pixtral_preemptions_total[5m]))"),
    ("Prefix-cache hit ratio", "percentunit", "sum(rate(ray_pixtral_prefix_cache_hits_total[5m])) / sum(rate(ray_pixtral_prefix_cache_queries_total[5m]))"),
    ("Encoder-cache hit ratio by replica (affinity routing keeps an image on one)", "percentunit",
     "sum by (replica) (rate(ray_pixtral_vision_cache_hits_total[5m])) / (sum by (replica) (rate(ray_pixtral_vision_cache_hits_total[5m])) + sum by (replica) (rate(ray_pixtral_vision_cache_misses_total[5m])))"),
    ("Prefix-cache hit ratio by replica", "percentunit", "sum by (replica) (rate(ray_pixtral_prefix_cache_hits_total[5m])) / sum by (replica) (rate(ray_pixtral_prefix_cache_queries_total[5m]))"),
    ("Affinity routing: share spilled past the affine replica (load bound), by pool", "percentunit",
     'sum by (pool) (rate(ray_pixtral_affinity_routes_total{outcome="spilled"}[5m])) / sum by (pool) (rate(ray_pixtral_affinity_routes_total[5m]))'),
    ("Requests failed alone in the engine/s", "short", "sum(rate(ray_pixtral_request_failures_total[5m]))"),
    ("Direct-stream frames/s / requests streamed through Serve for want of a mailbox/s", "short",
     "sum(rate(ray_pixtral_direct_stream_frames_total[5m]))"),
    ("", "short", "sum(rate(ray_pixtral_direct_stream_fallbacks_total[5m]))"),
    ("Ingress event-loop lag p99 / max bucket", "s", "histogram_quantile(0.99, sum by (le) (rate(ray_pixtral_event_loop_lag_seconds_bucket[5m])))"),
    ("", "s", "histogram_quantile(1.0, sum by (le) (rate(ray_pixtral_event_loop_lag_seconds_bucket[5m])))"),
]


def _for_models(expr: str) -> str:
    """Every series of the expression restricted to the models picked in the dashboard's `model` menu."""
    def restrict(match: re.Match) -> str:
        inner = match.group(2)
        return f'{match.group(1)}{{model=~"$model"{", " + inner if inner else ""}}}'

    return re.sub(r"(ray_pixtral_[a-z_]+)(?:\{([^}]*)\})?", restrict, expr)


def dashboard() -> dict:
    panels, targets = [], []
    for title, unit, expr in PANELS:
        if title:
            targets = []
            panels.append({"id": len(panels) + 1, "type": "timeseries", "title": title,
                           "datasource": {"type": "prometheus", "uid": "${datasource}"},
                           "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                           "gridPos": {"h": 8, "w": 12, "x": 12 * (len(panels) % 2), "y": 8 * (len(panels) // 2)},
                           "targets": targets})
        targets.append({"refId": chr(ord("A") + len(targets)), "expr": _for_models(expr)})
    return {"title": "pixtral-serve", "uid": "pixtral-serve", "schemaVersion": 39, "version": 1,
            "time": {"from": "now-1h", "to": "now"}, "refresh": "30s", "panels": panels,
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                # one app may serve several models; every panel follows this menu
                {"name": "model", "type": "query", "datasource": {"type": "prometheus", "uid": "${datasource}"},
                 "query": "label_values(ray_pixtral_http_requests_total, model)", "multi": True, "includeAll": True,
                 "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "refresh": 2}]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true")
    ns = parser.parse_args()
    stale = []
    outputs = [(ROOT / "k8s" / f"{t.name}.yaml", manifest_text(t)) for t in TARGETS]
    outputs.append((ROOT / "k8s" / "grafana-dashboard.json", json.dumps(dashboard(), indent=2) + "\n"))
    for path, text in outputs:
        if ns.check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
            print(path)
    if stale:
        sys.exit(f"out of date (run python -m serving.k8s_manifests): {stale}")


if __name__ == "__main__":
    main()
