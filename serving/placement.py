"""Fit the application to the Ray cluster it starts on, or say at once why it cannot be placed.

Serve waits forever for a replica whose resources no node has, and says nothing a new user would
find. So a local run (`pixtral-serve`) reads the cluster's nodes before it deploys:

- `fit_to_cluster` shrinks CPU asks that add up to more than the cluster has (every model's pools
  and decoders, when one app serves several). A CPU ask is a
  scheduling share, not a limit, so a smaller one costs nothing but Ray's bookkeeping. The decoder
  keeps its ask where it fits: it does the heavy work, and Ray gives an actor one thread per whole
  CPU it asks for. The ingress and vision pools share what is left, at their maximum replicas, so
  autoscaling never asks for a replica that cannot start. GPUs and custom resources are never
  shrunk: their asks are real.
- On CPU, `fit_to_cluster` also gives the decoder ranks the machine's cores as torch threads
  (`decoder.cpu_threads`, where not set): the cores divided among every decoder rank of the app.
  The ingress and vision pools mostly wait on I/O between bursts, and an ask is no limit, while the
  decoder's matmuls scale with threads: on a 2-core machine, 2 threads instead of 1 gave 1.5x the
  tokens/s at 32 concurrent text requests.
- `check_placeable` then checks every deployment (the decoder's placement group on one node when
  it is STRICT_PACK, as on CUDA) against the nodes, and raises `PlacementError` naming what was
  asked for and what the cluster has.
"""

from __future__ import annotations

import math
import os

from serving.config import AppConfig

# what Ray's own processes and Serve's proxy and controller need, left free when fitting
CPU_HEADROOM = 0.1
MIN_CPU_ASK = 0.01


class PlacementError(RuntimeError):
    """A deployment asks for resources that no node of the cluster has."""


def _floor(value: float) -> float:
    return max(math.floor(value * 100) / 100, MIN_CPU_ASK)


def decoder_cpus(cfg: AppConfig) -> float:
    """CPUs one decoder replica's placement group asks for (bundle 0 is the replica with TP > 1)."""
    d = cfg.decoder
    return d.tensor_parallel_size * d.cpus_per_rank + (0.1 if d.tensor_parallel_size > 1 else 0.0)


def _vision_max(cfg: AppConfig) -> int:
    v = cfg.vision
    return v.max_replicas if v.num_replicas == "auto" else int(v.num_replicas)


def decoder_replicas(cfg: AppConfig, most: bool) -> int:
    """The decoder's replica count: at most (autoscaled to its maximum) or at least."""
    d = cfg.decoder
    if d.num_replicas != "auto":
        return int(d.num_replicas)
    return d.max_replicas if most else d.min_replicas


def fit_to_cluster(configs: list[AppConfig], nodes: list[dict[str, float]]) -> list[str]:
    """Shrink the CPU asks of one app's models (in place) to fit the nodes' CPUs; returns what
    changed, in words. The ingress is the app's (the same settings in every config)."""
    total = sum(n.get("CPU", 0.0) for n in nodes) - CPU_HEADROOM
    several = len(configs) > 1
    notes = []

    def where(cfg: AppConfig) -> str:
        return f"{cfg.served_model_name}: " if several else ""

    def decoders() -> float:
        return sum(decoder_replicas(cfg, most=True) * decoder_cpus(cfg) for cfg in configs)

    # decoders keep their asks if that leaves something for the pools, else share half the cluster
    if decoders() > total * 0.8:
        share = total * 0.5 / decoders()
        for cfg in configs:
            new = _floor(cfg.decoder.cpus_per_rank * share)
            notes.append(f"{where(cfg)}decoder.cpus_per_rank {cfg.decoder.cpus_per_rank:g} -> {new:g}")
            cfg.decoder.cpus_per_rank = new
    notes += _decoder_threads(configs, nodes)
    rest = total - decoders()
    ingress = configs[0].ingress
    pools = ingress.max_replicas * ingress.num_cpus + sum(_vision_max(cfg) * cfg.vision.num_cpus for cfg in configs)
    if pools > rest:
        share = rest / pools
        new = _floor(ingress.num_cpus * share)
        notes.append(f"ingress.num_cpus {ingress.num_cpus:g} -> {new:g}")
        for cfg in configs:
            cfg.ingress.num_cpus = new
        for cfg in configs:
            new = _floor(cfg.vision.num_cpus * share)
            notes.append(f"{where(cfg)}vision.num_cpus {cfg.vision.num_cpus:g} -> {new:g}")
            cfg.vision.num_cpus = new
    return notes


def _decoder_threads(configs: list[AppConfig], nodes: list[dict[str, float]]) -> list[str]:
    """CPU decoders' torch threads (where not configured): the cores of the machine, which a local
    cluster is, shared evenly by the decoder ranks of every model at their maximum replicas."""
    cpu = [cfg for cfg in configs if cfg.device == "cpu" and cfg.decoder.cpu_threads is None]
    if not cpu:
        return []
    cores = min(int(max(n.get("CPU", 0.0) for n in nodes)), len(os.sched_getaffinity(0)))
    ranks = sum(decoder_replicas(cfg, most=True) * cfg.decoder.tensor_parallel_size for cfg in configs)
    threads = max(cores // ranks, 1)
    notes = []
    for cfg in cpu:
        if threads > max(int(cfg.decoder.cpus_per_rank), 1):
            cfg.decoder.cpu_threads = threads
            notes.append(f"{cfg.served_model_name + ': ' if len(configs) > 1 else ''}decoder.cpu_threads -> {threads} "
                         f"({cores} cores for {ranks} decoder rank{'s' if ranks > 1 else ''})")
    return notes


def _describe(ask: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(ask.items()) if v)


def _fits(ask: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in ask.items() if v)


def check_placeable(configs: list[AppConfig], nodes: list[dict[str, float]]) -> None:
    """Raise PlacementError if some deployment's replica (at its minimum count) cannot be placed."""
    from serving.app import decoder_bundles, ingress_options, vision_options

    def actor_ask(options: dict) -> dict[str, float]:
        actor = options["ray_actor_options"]
        return {"CPU": actor.get("num_cpus", 0.0), "GPU": actor.get("num_gpus", 0.0), **actor.get("resources", {})}

    have = "; ".join(f"node {k}: {_describe(n) or 'nothing'}" for k, n in enumerate(nodes)) or "no nodes"
    problems = []
    ingress = actor_ask(ingress_options(configs[0]))
    if not any(_fits(ingress, n) for n in nodes):
        problems.append(f"an ingress replica asks for {_describe(ingress)}, which no node has")
    minimum = dict(ingress, CPU=ingress["CPU"] * configs[0].ingress.min_replicas)
    for cfg in configs:
        model = f" of {cfg.served_model_name}" if len(configs) > 1 else ""
        vision = actor_ask(vision_options(cfg))
        if not any(_fits(vision, n) for n in nodes):
            problems.append(f"a vision pool replica{model} asks for {_describe(vision)}, which no node has")
        bundles = decoder_bundles(cfg)
        together = _sum(bundles)
        if cfg.device == "cuda":  # STRICT_PACK: the whole placement group on one node
            if not any(_fits(together, n) for n in nodes):
                problems.append(f"a decoder replica{model} (tensor parallel {cfg.decoder.tensor_parallel_size}) asks "
                                f"for {_describe(together)} on one node, which no node has")
        elif not all(any(_fits(b, n) for n in nodes) for b in bundles) or not _fits(together, _sum(nodes)):
            problems.append(f"a decoder replica{model} asks for {_describe(together)} in {len(bundles)} bundle(s), "
                            "more than the cluster has")
        minimum = _sum([minimum, _minimum_pools(cfg, vision, together)])
    if not problems and not _fits(minimum, _sum(nodes)):
        problems.append(f"the deployments at their minimum replicas ask for {_describe(minimum)} together, more "
                        "than the cluster has")
    if problems:
        raise PlacementError("cannot place the application: " + "; ".join(problems) + f". The cluster has: {have}. "
                             "Lower the asks (decoder.cpus_per_rank, decoder.gpus_per_rank, vision.num_cpus, "
                             "vision.num_gpus, ingress.num_cpus, tensor_parallel_size) or add nodes.")


def _sum(resources: list[dict[str, float]]) -> dict[str, float]:
    """Resource dicts (nodes, or bundles) added up."""
    out: dict[str, float] = {}
    for n in resources:
        for k, v in n.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _minimum_pools(cfg: AppConfig, vision: dict[str, float], decoder: dict[str, float]) -> dict[str, float]:
    """One model's vision pool and decoder at their minimum replicas, given one replica's asks."""
    v = cfg.vision
    vision_min = v.min_replicas if v.num_replicas == "auto" else int(v.num_replicas)
    decoder_min = decoder_replicas(cfg, most=False)
    return _sum([{k: val * vision_min for k, val in vision.items()},
                 {k: val * decoder_min for k, val in decoder.items()}])
