"""Cache-affinity routing: the bounded-load ring alone, then two replicas of each pool on the
session cluster, with affinity and with Serve's default router, on the same repeated images."""

from __future__ import annotations

import base64
import hashlib
import io
import random
from collections import Counter

import httpx

from model.tiny import tiny_args
from serving.routing import BoundedLoadRing, prefix_key
from tests.helpers import random_image, wait_healthy


def test_a_key_stays_on_its_member_and_only_a_removed_members_keys_move():
    ring = BoundedLoadRing()
    ring.set_members(["a", "b", "c"])
    keys = [f"image-{i}" for i in range(600)]
    first = {k: ring.ranked(k, {})[0][0] for k in keys}
    assert first == {k: ring.ranked(k, {})[0][0] for k in keys}  # deterministic
    share = Counter(first.values())
    assert all(120 < n < 280 for n in share.values()), share  # each member gets a fair share
    ring.set_members(["a", "b"])
    moved = [k for k in keys if ring.ranked(k, {})[0][0] != first[k]]
    assert moved and all(first[k] == "c" for k in moved)


def test_a_hot_key_spills_past_the_load_bound():
    """One image requested over and over: its member takes it only while under 1.25x the mean
    load, then the next member along the ring does."""
    ring = BoundedLoadRing(load_factor=1.25)
    ring.set_members(["a", "b", "c", "d"])
    loads = {m: 0 for m in ring.members}
    placed = []
    for _ in range(40):  # 40 requests in flight at once, all for one image
        order, affine = ring.ranked("hot", loads)
        loads[order[0]] += 1
        placed.append(affine)
    bound = 1.25 * 40 / 4
    assert max(loads.values()) <= bound + 1, loads
    assert placed[0] and not all(placed)
    assert ring.capacity({"a": 3}) == 2  # ceil(1.25 * 4 / 4)


def test_prefix_keys_follow_images_then_tokens():
    assert prefix_key(["h1", "h2"], [1, 2, 3]) == prefix_key(["h1", "h2"], [9, 9])
    assert prefix_key([], list(range(300))) == prefix_key([], list(range(256)) + [7] * 44)
    assert prefix_key([], [1, 2]) != prefix_key([], [1, 3])


def _png(seed: int) -> tuple[str, str]:
    buf = io.BytesIO()
    random_image(128, 128, seed).save(buf, format="PNG")
    data = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode(), hashlib.sha256(data).hexdigest()


IMAGES_PER_PAIR = 3  # of each (vision replica, decoder replica) pair: 12 images, 6 per replica
# each vision replica's cache holds 7 images; each decoder's KV cache the 5 blocks of 6 prompts
# (79 tokens and the one generated), and of the one being run: half the working set and a little
CACHED_IMAGES = 7
BLOCKS_PER_REQUEST = 5
KV_BLOCKS = 7 * BLOCKS_PER_REQUEST
ROUNDS = 6


def _deploy(mistral_12b, affinity: bool) -> None:
    from ray import serve

    from serving.app import build_app

    # a 128x128 image is 8x8 patches of 32 features (fp32); its prompt 72 image tokens + text
    vision_bytes = 64 * 32 * 4
    args = tiny_args("12b")
    block_bytes = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 16 * 4  # K and V, fp32
    config = {
        "model": str(mistral_12b), "served_model_name": "pixtral-affinity", "max_model_len": 128,
        "ingress": {"num_cpus": 0.1, "min_replicas": 1, "max_replicas": 1},
        "vision": {"num_cpus": 0.1, "num_replicas": 2, "cache_bytes": CACHED_IMAGES * vision_bytes,
                   "affinity_routing": affinity},
        "decoder": {"num_replicas": 2, "cpus_per_rank": 0.2, "kv_cache_bytes": KV_BLOCKS * block_bytes,
                    "max_num_seqs": 4, "affinity_routing": affinity},
    }
    serve.run(build_app(config), name="affinity", route_prefix="/affinity", blocking=False)


def _stats(deployment: str) -> dict[str, dict]:
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name="affinity")
    return {s["replica"]: s for s in handle.broadcast("stats").results()}


def _body(url: str) -> dict:
    return {"model": "pixtral-affinity", "max_tokens": 1, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "What is it?"}]}]}


def _run(base: str, images: list[str], rounds: int) -> None:
    rng = random.Random(0)
    with httpx.Client(timeout=120) as http:
        for _ in range(rounds):
            for url in rng.sample(images, len(images)):
                r = http.post(f"{base}/v1/chat/completions", json=_body(url))
                assert r.status_code == 200, r.text


def _hit_rates(before: dict, after: dict) -> tuple[float, float]:
    def total(stats: dict, key: str) -> int:
        return sum(s[key] for s in stats.values())

    v_hits = total(after["vision"], "cache_hits") - total(before["vision"], "cache_hits")
    v_miss = total(after["vision"], "cache_misses") - total(before["vision"], "cache_misses")
    d_hits = total(after["decoder"], "prefix_hit_blocks") - total(before["decoder"], "prefix_hit_blocks")
    d_queries = total(after["decoder"], "prefix_queried_blocks") - total(before["decoder"], "prefix_queried_blocks")
    return v_hits / (v_hits + v_miss), d_hits / d_queries


def test_affinity_routing_keeps_repeated_images_in_cache(served, mistral_12b):
    """12 images, each replica's caches room for 7: routed by affinity each replica keeps its 6
    and (after one warm-up round) hits every time; Serve's default router sends every image to
    both replicas, which then evict each other's work."""
    from ray import serve

    base = served + "/affinity"
    try:
        _deploy(mistral_12b, affinity=True)
        wait_healthy(base)
        vision, decoder = _stats("VisionEncoder"), _stats("Decoder")
        assert len(vision) == 2 and len(decoder) == 2
        # a working set the two rings split evenly: 3 images for each pair of replicas
        v_ring, d_ring = BoundedLoadRing(), BoundedLoadRing()
        v_ring.set_members(list(vision))
        d_ring.set_members(list(decoder))
        pairs: dict[tuple[str, str], list[str]] = {}
        for seed in range(1000):
            url, digest = _png(seed)
            pair = (v_ring.walk(digest)[0], d_ring.walk(prefix_key([digest], []))[0])
            if len(pairs.setdefault(pair, [])) < IMAGES_PER_PAIR:
                pairs[pair].append(url)
            if len(pairs) == 4 and all(len(p) == IMAGES_PER_PAIR for p in pairs.values()):
                break
        images = [url for urls in pairs.values() for url in urls]
        assert len(images) == 4 * IMAGES_PER_PAIR
        count = httpx.post(f"{base}/v1/chat/token_count", json=_body(images[0])).json()["prompt_tokens"]
        assert -(-(count + 1) // 16) == BLOCKS_PER_REQUEST, count  # the KV budget above assumes it

        _run(base, images, 1)  # warm-up round: every first sight is a miss
        before = {"vision": _stats("VisionEncoder"), "decoder": _stats("Decoder")}
        _run(base, images, ROUNDS)
        affinity = _hit_rates(before, {"vision": _stats("VisionEncoder"), "decoder": _stats("Decoder")})

        _deploy(mistral_12b, affinity=False)  # new replicas, empty caches, Serve's default router
        wait_healthy(base)
        _run(base, images, 1)
        before = {"vision": _stats("VisionEncoder"), "decoder": _stats("Decoder")}
        _run(base, images, ROUNDS)
        default = _hit_rates(before, {"vision": _stats("VisionEncoder"), "decoder": _stats("Decoder")})
        print(f"hit rates (vision, decoder prefix): affinity {affinity}, Serve's default router {default}")
        assert min(affinity) >= 0.9, affinity
        # Serve's router picks between the replicas by chance here (their queues are equally short),
        # so its hit rates are a draw: 0.54 and 0.72 in one CI run, where a fixed bound of 0.7 on
        # them failed. What must hold is that each falls short of affinity's; by how much is
        # benchmarks/affinity.py's to measure.
        assert all(d < a for d, a in zip(default, affinity)), (default, affinity)
    finally:
        if "affinity" in serve.status().applications:
            serve.delete("affinity")
