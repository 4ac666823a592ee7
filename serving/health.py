"""The health of a replica process: readiness for probes, event-loop lag, heap retention.

Readiness comes from Serve's own view of the deployments, cached, so health probes cost nothing:
Serve's controller health-checks every replica itself (`check_health`, every few seconds); asking
it for the deployments' replica states costs one call to the controller, which `Readiness` makes
at most once per `ttl_s` however many probes arrive, and never through a deployment's queue.
"""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections.abc import Callable


def model_readiness(running: dict[str, int], models: dict[str, list[str]]) -> dict[str, str]:
    """Each model's readiness from its deployments' running replica counts: "ok", or why not."""
    verdict = {}
    for model, deployments in models.items():
        down = [name for name in deployments if not running.get(name, 0)]
        verdict[model] = f"{down[0]} has no running replica" if down else "ok"
    return verdict


class Readiness:
    """`models`: each served model's deployments (its vision pool and decoder). The app is ready
    while any model is: with several models, one model's outage (a decoder pod being replaced)
    must not take the others out of the load balancer. `get(model)` answers for one model."""

    def __init__(self, app_name: str, models: dict[str, list[str]], ttl_s: float = 2.0,
                 timeout_s: float = 5.0) -> None:
        self.app_name, self.models = app_name, models
        self.ttl_s, self.timeout_s = ttl_s, timeout_s
        self._value: dict[str, str] | str | None = None  # per model, or why the whole app is not ready
        self._at = 0.0
        self._refresh: asyncio.Task | None = None

    async def get(self, model: str | None = None) -> tuple[bool, str, dict[str, str]]:
        """(ready, why not, each model's readiness) for the app or for `model`: the cached answer,
        refreshed in the background when it is stale."""
        if time.monotonic() - self._at > self.ttl_s and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.ensure_future(self._update())
        if self._value is None:  # the first probe waits for the first answer
            try:
                await asyncio.wait_for(asyncio.shield(self._refresh), self.timeout_s)
            except asyncio.TimeoutError:
                return False, "Serve's controller did not answer", {}
        if isinstance(self._value, str):
            return False, self._value, {}
        models = self._value
        if model is not None:
            return models[model] == "ok", models[model], models
        if any(v == "ok" for v in models.values()):
            return True, "ok", models
        return False, "; ".join(f"{m}: {why}" for m, why in models.items()), models

    async def _update(self) -> None:
        try:
            self._value = await asyncio.wait_for(asyncio.to_thread(self._ask_controller), self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - not ready until the controller answers
            self._value = f"cannot read Serve's status: {type(exc).__name__}"
        self._at = time.monotonic()

    def _ask_controller(self) -> dict[str, str] | str:
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        if app is None:
            return f"application {self.app_name!r} is not deployed"
        running = {name: d.replica_states.get("RUNNING", 0) for name, d in app.deployments.items()}
        return model_readiness(running, self.models)


class LoopLagMonitor:
    """How late the event loop wakes a timer: for that long, every coroutine on it was blocked.

    Each lateness goes to `on_lag` (a histogram); the worst since the last `take_worst()` is kept.
    """

    def __init__(self, on_lag: Callable[[float], None], period_s: float = 0.05) -> None:
        self.on_lag, self.period_s = on_lag, period_s
        self.worst = 0.0
        self._task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        """Start on the serving loop (called from a request: a replica's __init__ may run elsewhere)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.period_s)
            lag = max(time.perf_counter() - started - self.period_s, 0.0)
            self.worst = max(self.worst, lag)
            self.on_lag(lag)

    def take_worst(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst


def start_heap_trimmer(period_s: float = 20.0) -> None:
    """Hand freed heap memory back to the OS every `period_s` (glibc's malloc_trim), from a thread.

    Large transient tensors (a long prefill, a batch of big images) leave glibc's heaps holding
    freed pages: resident memory then creeps up under varied load although live memory does not
    (benchmarks/soak.py showed it), and a container's memory limit counts the retained pages. A
    no-op where the C library has no malloc_trim.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return

    def loop() -> None:
        while True:
            time.sleep(period_s)
            trim(0)

    threading.Thread(target=loop, name="heap-trim", daemon=True).start()
