"""Cache-affinity routing for the vision pool and the decoder, as Serve request routers.

Each vision replica caches encoder outputs by image content hash, and each decoder replica keeps
a prefix cache keyed by image hashes and tokens. Serve's default router (power of two choices)
ignores both, so with N replicas a repeated image lands on the replica that has it 1/N of the time.

`AffinityRouter` is a Serve `RequestRouter` (Serve's extension point for routing; it runs in the
caller, the ingress replica, one per handle). It sends a request to the replica its affinity key
hashes to on a consistent-hash ring, with bounded loads (Mirrokni, Thorup and Zadimoghaddam,
"Consistent Hashing with Bounded Loads", 2017): a replica takes a key only while its load is
under `load_factor` times the mean (counting this request), else the key moves on along the ring.
So a hot image spreads to the next replica instead of piling onto one, and when a replica is
added or removed only its own share of keys moves.

The key comes from the call's first argument, an object with an `affinity_key` (None: no
affinity, two random replicas as Serve's default does):
- vision: the image's content hash;
- decoder: the prompt's image hashes, or without images its first `PREFIX_KEY_TOKENS` tokens.

Every request is ranked: the chosen replica first, then the others in ring order. Serve sends it
to the first rank whose replica has room (below max_ongoing_requests). The metric
`pixtral_affinity_routes_total{pool, outcome}` counts requests sent to their affine replica
("affine") or past it because of the load bound ("spilled"); the caches' own hit counters say
what the routing earned.
"""

from __future__ import annotations

import bisect
import hashlib
import random
import weakref

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from serving.metrics import metric

# without images, a decoder request's key is its first tokens: a system prompt plus the start of
# the conversation (a multiple of the KV block size, the prefix cache's unit)
PREFIX_KEY_TOKENS = 256


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class BoundedLoadRing:
    """A consistent-hash ring of members with bounded loads. Pure logic, no Ray."""

    def __init__(self, virtual_nodes: int = 64, load_factor: float = 1.25) -> None:
        if load_factor <= 1.0:
            raise ValueError(f"load_factor must be above 1, got {load_factor}")
        self.virtual_nodes = virtual_nodes
        self.load_factor = load_factor
        self._points: list[int] = []
        self._owners: list[str] = []
        self._members: tuple[str, ...] = ()

    def set_members(self, members: list[str]) -> None:
        members = tuple(sorted(set(members)))
        if members == self._members:
            return
        ring = sorted((_point(f"{m}#{v}"), m) for m in members for v in range(self.virtual_nodes))
        self._points = [p for p, _ in ring]
        self._owners = [m for _, m in ring]
        self._members = members

    @property
    def members(self) -> tuple[str, ...]:
        return self._members

    def walk(self, key: str) -> list[str]:
        """Every member once, in ring order from the key's point."""
        if not self._members:
            return []
        start = bisect.bisect(self._points, _point(key))
        seen: dict[str, None] = {}
        for i in range(len(self._owners)):
            seen.setdefault(self._owners[(start + i) % len(self._owners)], None)
            if len(seen) == len(self._members):
                break
        return list(seen)

    def capacity(self, loads: dict[str, int]) -> int:
        """The most load a member may have and still take one more request."""
        total = sum(loads.get(m, 0) for m in self._members) + 1  # this request included
        return max(int(self.load_factor * total / max(len(self._members), 1) + 0.999999), 1)

    def ranked(self, key: str, loads: dict[str, int]) -> tuple[list[str], bool]:
        """Members in the order to try, and whether the first is the key's own (not spilled):
        the first member along the ring whose load is under the bound, then the rest in ring order."""
        order = self.walk(key)
        if not order:
            return [], False
        bound = self.capacity(loads)
        first = next((i for i, m in enumerate(order) if loads.get(m, 0) < bound), 0)
        return order[first:] + order[:first], first == 0


class AffinityRouter(RequestRouter):
    """Serve request router: consistent hashing with bounded loads on the call's `affinity_key`."""

    def initialize_state(self, pool: str = "vision", model: str = "", load_factor: float = 1.25,
                         virtual_nodes: int = 64) -> None:
        self.tags = {"model": model, "pool": pool}
        self.ring = BoundedLoadRing(virtual_nodes, load_factor)
        # the request each routing attempt is for, by its metadata object (see below)
        self._routing: weakref.WeakValueDictionary[int, PendingRequest] = weakref.WeakValueDictionary()

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Give the replica to the request it was chosen for.

        Serve matches a chosen replica to its request by `internal_request_id`, which the calls a
        request makes share: a request's images go to the vision pool as sibling calls, and its
        n choices to the decoder. Serve's index keeps one request per id, so without this a
        sibling's replica went to the first sibling and the other waited forever. (Serve's
        default router hands replicas out first-in first-out instead, which would undo
        affinity.) Uses the base router's pending-request index, a private attribute."""
        mine = self._routing.pop(id(request_metadata), None) if request_metadata is not None else None
        indexed = self._pending_requests_by_id.get(request_metadata.internal_request_id) if mine else None
        if mine is not None and indexed is not mine and not mine.future.done():
            mine.future.set_result(replica)
            return
        super()._fulfill_next_pending_request(replica, request_metadata)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.ring.set_members([r.replica_id.unique_id for r in replicas])

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all full: wait, do not spin
            self._routing[id(pending_request.metadata)] = pending_request
        key = None
        if pending_request is not None and pending_request.args:
            key = getattr(pending_request.args[0], "affinity_key", None)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if key is None or not by_id:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        self.ring.set_members(list(by_id))
        cache = self.replica_queue_len_cache
        loads = {rid: cache.get(r.replica_id) or 0 for rid, r in by_id.items()}
        order, affine = self.ring.ranked(key, loads)
        metric("pixtral_affinity_routes_total").inc(tags={**self.tags, "outcome": "affine" if affine else "spilled"})
        return [[by_id[rid]] for rid in order]


def router_config(pool: str, model: str, load_factor: float) -> dict:
    """The deployment option that puts `AffinityRouter` in front of a pool."""
    return {"request_router_class": "serving.routing:AffinityRouter",
            "request_router_kwargs": {"pool": pool, "model": model, "load_factor": load_factor}}


def prefix_key(image_hashes: list[str], prompt_token_ids: list[int]) -> str:
    """A decoder request's affinity key: its images if it has any (they dominate the prefill),
    else its first tokens."""
    if image_hashes:
        return "img:" + ",".join(image_hashes)
    head = prompt_token_ids[:PREFIX_KEY_TOKENS]
    return "tok:" + hashlib.blake2b(",".join(map(str, head)).encode(), digest_size=12).hexdigest()
