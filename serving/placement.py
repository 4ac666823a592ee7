"""Fit the application to the Ray cluster it starts on, or say at once why it cannot be placed.

Serve waits forever for a replica whose resources no node has, and says nothing a new user would
find. So a local run (`pixtral-serve`) reads the cluster's nodes before it deploys:

- `fit_to_cluster` shrinks CPU asks that add up to more than the cluster has. A CPU ask is a
  scheduling share, not a limit, so a smaller one costs nothing but Ray's bookkeeping. The decoder
  keeps its ask where it fits: it does the heavy work, and Ray gives an actor one thread per whole
  CPU it asks for. The ingress and vision pools share what is left, at their maximum replicas, so
  autoscaling never asks for a replica that cannot start. GPUs and custom resources are never
  shrunk: their asks are real.
- `check_placeable` then checks every deployment (the decoder's placement group on one node when
  it is STRICT_PACK, as on CUDA) against the nodes, and raises `PlacementError` naming what was
  asked for and what the cluster has.
"""

from __future__ import annotations

import math

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


def fit_to_cluster(cfg: AppConfig, nodes: list[dict[str, float]]) -> list[str]:
    """Shrink `cfg`'s CPU asks (in place) to fit the nodes' CPUs; returns what changed, in words."""
    total = sum(n.get("CPU", 0.0) for n in nodes) - CPU_HEADROOM
    d, v, i = cfg.decoder, cfg.vision, cfg.ingress
    notes = []
    decoders = decoder_replicas(cfg, most=True) * decoder_cpus(cfg)
    # the decoder keeps its ask if that leaves something for the two pools, else half the cluster
    if decoders > total * 0.8:
        share = total * 0.5 / decoders
        new = _floor(d.cpus_per_rank * share)
        notes.append(f"decoder.cpus_per_rank {d.cpus_per_rank:g} -> {new:g}")
        d.cpus_per_rank = new
        decoders = decoder_replicas(cfg, most=True) * decoder_cpus(cfg)
    rest = total - decoders
    pools = i.max_replicas * i.num_cpus + _vision_max(cfg) * v.num_cpus
    if pools > rest:
        share = rest / pools
        for name, section in (("ingress", i), ("vision", v)):
            new = _floor(section.num_cpus * share)
            notes.append(f"{name}.num_cpus {section.num_cpus:g} -> {new:g}")
            section.num_cpus = new
    return notes


def _describe(ask: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(ask.items()) if v)


def _fits(ask: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(k, 0.0) + 1e-9 >= v for k, v in ask.items() if v)


def check_placeable(cfg: AppConfig, nodes: list[dict[str, float]]) -> None:
    """Raise PlacementError if some deployment's replica (at its minimum count) cannot be placed."""
    from serving.app import decoder_bundles, ingress_options, vision_options

    def actor_ask(options: dict) -> dict[str, float]:
        actor = options["ray_actor_options"]
        return {"CPU": actor.get("num_cpus", 0.0), "GPU": actor.get("num_gpus", 0.0), **actor.get("resources", {})}

    have = "; ".join(f"node {k}: {_describe(n) or 'nothing'}" for k, n in enumerate(nodes)) or "no nodes"
    problems = []
    for name, ask in (("ingress", actor_ask(ingress_options(cfg))), ("vision pool", actor_ask(vision_options(cfg)))):
        if not any(_fits(ask, n) for n in nodes):
            problems.append(f"a {name} replica asks for {_describe(ask)}, which no node has")
    bundles = decoder_bundles(cfg)
    together = _sum(bundles)
    if cfg.device == "cuda":  # STRICT_PACK: the whole placement group on one node
        if not any(_fits(together, n) for n in nodes):
            problems.append(f"a decoder replica (tensor parallel {cfg.decoder.tensor_parallel_size}) asks for "
                            f"{_describe(together)} on one node, which no node has")
    elif not all(any(_fits(b, n) for n in nodes) for b in bundles) or not _fits(together, _sum(nodes)):
        problems.append(f"a decoder replica asks for {_describe(together)} in {len(bundles)} bundle(s), more "
                        "than the cluster has")
    minimum = _minimum_total(cfg, together)
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


def _minimum_total(cfg: AppConfig, decoder: dict[str, float]) -> dict[str, float]:
    v, i = cfg.vision, cfg.ingress
    vision_min = v.min_replicas if v.num_replicas == "auto" else int(v.num_replicas)
    total = {k: val * decoder_replicas(cfg, most=False) for k, val in decoder.items()}
    total["CPU"] = total.get("CPU", 0.0) + vision_min * v.num_cpus + i.min_replicas * i.num_cpus
    total["GPU"] = total.get("GPU", 0.0) + vision_min * (v.num_gpus or 0.0)
    return total
