"""Load and faults on the running app, loopback only, bounded in requests and time."""

from __future__ import annotations

import asyncio
import threading
import time

import ray

from benchmarks.loadgen import run_load


def test_load_every_request_completes(served):
    # five full waves at concurrency 32: the queue, the vision pool and the decoder's batch all fill
    # and drain several times over (300 requests took 135 s of a 13-minute suite and found no more)
    n = 160
    report = asyncio.run(run_load(served, "pixtral-test", n=n, concurrency=32))
    failures = [r for r in report.results if not r.ok]
    assert len(report.results) == n
    assert not failures, failures[:5]
    assert report.server_errors == 0
    print(f"load: {n} requests in {report.elapsed:.1f}s, p50 TTFT {report.percentile('ttft', 0.5):.2f}s, "
          f"p99 {report.percentile('ttft', 0.99):.2f}s")


def vision_replica_names(app: str = "pixtral") -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app}#VisionEncoder#")]


def running_vision_replicas(app: str = "pixtral") -> int:
    from ray import serve

    return serve.status().applications[app].deployments["VisionEncoder"].replica_states.get("RUNNING", 0)


def test_killing_a_vision_replica_under_load_loses_nothing(served):
    (victim,) = vision_replica_names()
    outcome = {}

    def load() -> None:
        outcome["report"] = asyncio.run(run_load(served, "pixtral-test", n=80, concurrency=8))

    worker = threading.Thread(target=load)
    worker.start()
    time.sleep(3)  # let image requests flow into the replica
    killed_at = time.time()
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    recovered_at = None
    while time.time() - killed_at < 120:
        names = vision_replica_names()
        if names and victim not in names and running_vision_replicas() == 1:
            recovered_at = time.time()
            break
        time.sleep(0.5)
    worker.join(timeout=300)
    report = outcome["report"]
    assert recovered_at is not None, "no new vision replica came up"
    print(f"vision replica replaced in {recovered_at - killed_at:.1f}s")
    failures = [r for r in report.results if not r.ok]
    assert len(report.results) == 80 and not failures, failures[:5]
